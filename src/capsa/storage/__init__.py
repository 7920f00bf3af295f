"""Sharing host directories with the guest: virtiofsd (:mod:`.virtiofsd`) for
virtio-fs; 9p needs no helper process (QEMU serves it, see
:class:`capsa.hypervisor.base.NinePShare`)."""
