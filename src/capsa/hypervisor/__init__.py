"""VMMs behind one narrow interface (:mod:`.base`), QEMU's driver (:mod:`.qemu`),
the accelerator choice (:mod:`.accel`) and the helper-process plumbing they
share with virtiofsd (:mod:`.process`)."""
