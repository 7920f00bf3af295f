"""What every verb gets: the parsed global flags and the configuration."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from capsa.config import Config, load_config
from capsa.runtime.state import DEFAULT_ROOT, StateStore

if TYPE_CHECKING:
    from capsa.runtime.lifecycle import Runtime


@dataclass
class Context:
    root: Path
    config_flag: str | None
    debug: bool
    log_format: str
    systemd_cgroup: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Context:
        return cls(
            root=Path(args.root) if args.root else DEFAULT_ROOT,
            config_flag=args.config,
            debug=args.debug,
            log_format=args.log_format,
            systemd_cgroup=bool(getattr(args, "systemd_cgroup", False)),
        )

    @cached_property
    def config(self) -> Config:
        # Loaded on first use: `capsa spec` and `capsa version` need none.
        return load_config(self.config_flag)

    @cached_property
    def store(self) -> StateStore:
        return StateStore(self.root)

    @cached_property
    def runtime(self) -> Runtime:
        from capsa.runtime.lifecycle import Runtime  # the verbs that need no VM stay light

        return Runtime(
            self.config,
            self.store,
            self.config_flag,
            self.debug or self.config.runtime.debug,
            systemd_cgroup=self.systemd_cgroup,
        )
