"""What `capsa check` says template clones share, and what removes it."""

from __future__ import annotations

from capsa.cli.check import template_exposure
from capsa.config import HypervisorConfig
from capsa.runtime.sandbox import renews_agent


def test_a_clone_renews_its_agent_under_kvm_by_default_and_when_told() -> None:
    assert renews_agent("auto", "kvm") and not renews_agent("auto", "tcg")
    assert renews_agent("always", "tcg") and not renews_agent("never", "kvm")


def test_check_names_what_clones_share_and_the_settings_that_remove_it() -> None:
    under_tcg = template_exposure(HypervisorConfig(), "tcg")
    assert under_tcg.level == "warn"
    assert "hash seed" in under_tcg.text and 'boot = "cold" removes this' in under_tcg.text
    assert 'template_renew_agent = "always"' in under_tcg.text
    assert "at most 100 clones, 86400 s per template" in under_tcg.text
    under_kvm = template_exposure(HypervisorConfig(), "kvm")
    assert under_kvm.level == "ok" and "hash seed" not in under_kvm.text
    unbounded = template_exposure(HypervisorConfig(template_max_clones=0, template_max_age=0), "kvm")
    assert "at most unbounded clones, no age bound per template" in unbounded.text
