"""Command-line entry shared by the experiment scripts: ``--config file.py`` with
``--config.a.b=value`` overrides (ml_collections), checked so that an unknown key
is a clear error naming the key and the keys that exist."""

from __future__ import annotations

import sys

import ml_collections


def unknown_override_keys(
    config: ml_collections.ConfigDict, argv: list[str]
) -> list[tuple[str, list[str]]]:
    """The ``--config.KEY=...`` overrides in ``argv`` whose KEY is not in ``config``,
    each with the keys available at the level where the lookup failed."""
    bad = []
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config.") :].split("=", 1)[0]
        node = config
        for part in path.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                bad.append((path, known))
                break
            node = node[part]
    return bad


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def define_distributed_flags(flags) -> None:
    """``--coordinator_address``, ``--num_processes``, ``--process_id`` for
    ``jax.distributed.initialize`` (not needed on SLURM or a TPU pod: detected)."""
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs)")
    flags.DEFINE_integer("num_processes", None, "number of processes (multi-process runs)")
    flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes)")


def configure_logging(verbose: bool) -> None:
    """The terminal is for progress bars, warnings and results: deqjax's own messages
    at INFO (process 0; others ERROR), everyone else's (absl, orbax's checkpoint
    chatter) at WARNING unless ``--verbose`` or absl's ``--verbosity`` asks for more."""
    import logging

    from absl import flags
    from absl import logging as absl_logging

    from experiments import parallel

    verbose = verbose or ("verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present)
    level = logging.INFO if verbose else logging.WARNING
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    logging.getLogger().setLevel(level)
    logging.getLogger("absl").setLevel(level)
    own = logging.INFO if parallel.is_main_process() else logging.ERROR
    logging.getLogger("deqjax").setLevel(own)


def with_distributed(main):
    """``main`` preceded by ``jax.distributed.initialize`` when the flags or the
    environment (SLURM, TPU pod) ask for several processes, and by
    :func:`configure_logging`. An invalid ``--config`` value or a damaged checkpoint
    ends the program with ``error: …`` on stderr (exit status 2 / 1), no traceback."""

    def wrapped(argv):
        from absl import flags

        from experiments import parallel
        from experiments.common import CheckpointError, ConfigError, validate_config

        f = flags.FLAGS
        try:
            if "config" in f and f["config"].present:
                validate_config(f.config)  # before anything starts
            parallel.maybe_initialize_distributed(
                f.coordinator_address, f.num_processes, f.process_id
            )
            configure_logging(f.verbose)
            return main(argv)
        except (ConfigError, CheckpointError) as e:  # one clear line, no traceback
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2 if isinstance(e, ConfigError) else 1)

    return wrapped


def flag(name: str):
    """The value of a parsed command-line flag."""
    from absl import flags

    return getattr(flags.FLAGS, name)


def report_overrides() -> dict:
    """The robustness options given on the command line (``--eps=…`` etc.)."""
    from experiments.report import REPORT_KEYS

    return {k: flag(k) for k in REPORT_KEYS if flag(k) is not None}


def run_workdir(main, workdir_help: str, extra_flags=None) -> None:
    """The CLI of a script over a trained workdir: ``--workdir``, the distributed flags
    and ``--verbose`` (plus ``extra_flags(flags)``)."""
    from absl import app, flags

    flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flags_as_required(["workdir"])
    _define_common_flags(flags)
    if extra_flags is not None:
        extra_flags(flags)
    app.run(with_distributed(main))


def run_report(main, workdir_help: str, extra_flags=None) -> None:
    """:func:`run_workdir` plus one ``--KEY`` per robustness option
    (:data:`experiments.report.REPORT_KEYS`, overriding the config's ``robustness``
    block)."""
    from experiments.report import REPORT_KEYS

    def flags_too(flags):
        for key in REPORT_KEYS:
            flags.DEFINE_string(key, None, f"override robustness.{key}")
        if extra_flags is not None:
            extra_flags(flags)

    run_workdir(main, workdir_help, flags_too)


def _define_common_flags(flags) -> None:
    define_distributed_flags(flags)
    flags.DEFINE_bool("verbose", False, "also show INFO logs of absl/orbax")


def run(main, extra_flags=None) -> None:
    """Define ``--config``/``--workdir``, the distributed flags (plus
    ``extra_flags(flags)``), check overrides, start JAX's distributed runtime when asked,
    run ``main``."""
    from absl import app, flags
    from ml_collections import config_flags

    from experiments.common import load_config_file

    path = _config_path(sys.argv)
    if path is not None:
        bad = unknown_override_keys(load_config_file(path), sys.argv[1:])
        if bad:
            for key, known in bad:
                print(
                    f"error: unknown config key 'config.{key}' (not in {path}); "
                    f"keys available there: {', '.join(known)}",
                    file=sys.stderr,
                )
            sys.exit(2)
    config_flags.DEFINE_config_file(
        "config", None, "experiment config file (.py)", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and reports")
    flags.mark_flags_as_required(["config", "workdir"])
    _define_common_flags(flags)
    if extra_flags is not None:
        extra_flags(flags)
    app.run(with_distributed(main))
