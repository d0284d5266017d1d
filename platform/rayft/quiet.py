"""Keep library chatter out of what a user reads; real errors still reach the driver as
exceptions, and `--verbose` shows worker logs in full. Used by every process rayft starts: the
CLI, Ray workers, data and evaluation tasks."""

from __future__ import annotations

import logging
import os
import warnings

NOISY_LOGGERS = (
    "ray.train",
    "ray.data",
    "ray.tune",
    "ray.air",
    "bitsandbytes",
    "deepspeed",
    "accelerate",
    "torch.distributed",
    "datasets",
    "transformers",
    "peft",
    "trl",
    "filelock",
)


def quiet_env() -> dict[str, str]:
    """Environment for workers and the driver: progress bars and advisories off, Ray Train tuned."""
    return {
        "TRANSFORMERS_VERBOSITY": "error",
        "DATASETS_VERBOSITY": "error",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TQDM_DISABLE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_TRAIN_V2_ENABLED": "1",
        # Ray Train's controller polls its workers every 2 s by default, so a finished run waited
        # ~4 s more for its worker group to be torn down (bench/results/startup.md); a poll is one
        # small actor call per worker
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
        "RAY_DEDUP_LOGS": "1",
        "PYTHONWARNINGS": "ignore",
        # Ray Data re-applies its own logger levels at import; its failure dumps (operator
        # statistics) are not for users: rayft reports the error itself.
        "RAY_DATA_LOG_LEVEL": "CRITICAL",
        # Ray Tune's own progress tables and per-trial tracebacks: `rayft tune` prints its table.
        "RAY_AIR_NEW_OUTPUT": "0",
    }


def errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def silence_libraries() -> None:
    """Library loggers to errors only. Done before the libraries are imported, as some warn at
    import; DeepSpeed resets its logger's level on import, so it gets a filter instead."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    deepspeed = logging.getLogger("DeepSpeed")
    if errors_only not in deepspeed.filters:
        deepspeed.addFilter(errors_only)


def quiet_driver() -> None:
    """Library warnings that a user cannot act on stay out of the terminal."""
    logging.getLogger("ray").setLevel(logging.ERROR)
    silence_libraries()


def quiet_worker() -> None:
    os.environ.update(quiet_env())
    warnings.filterwarnings("ignore")
    silence_libraries()
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass
