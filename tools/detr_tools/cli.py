"""What the scripts in ``tools/`` share: the config from a YAML file and overrides, logging, and
how a run ends.

A user error (a missing file, an unknown config key or a bad value, an unsafe or mismatched
checkpoint: :class:`detr_d2.errors.UserInputError` and the cases below) ends the tool with one
line on stderr, ``<tool>: error: <what to do>``, and exit status 2, as argparse does for bad
arguments; anything else is unexpected and keeps its traceback.
"""

import os
import sys
from collections.abc import Callable, Sequence

from detectron2.config import CfgNode, get_cfg
from detectron2.utils.logger import setup_logger

from detr_d2 import add_detr_config
from detr_d2.config import merge_detr_config_file
from detr_d2.errors import UserInputError

__all__ = ["USER_ERROR_EXIT", "load_config", "run", "setup_logging"]

USER_ERROR_EXIT = 2


def load_config(config_file: str, opts: Sequence[str] = (), freeze: bool = False) -> CfgNode:
    """Detectron2's defaults + :func:`add_detr_config` + ``config_file`` + ``KEY VALUE`` overrides,
    with a :class:`UserInputError` naming the file or key when one of them is wrong."""
    if not os.path.isfile(config_file):
        raise UserInputError(f"--config-file {config_file}: no such file")
    cfg = get_cfg()
    add_detr_config(cfg)
    try:
        merge_detr_config_file(cfg, config_file)
    except KeyError as e:  # yacs: "Non-existent config key: MODEL.X", or "... was renamed to ..."
        raise UserInputError(f"{config_file}: {_key_error(e)}") from None
    except (ValueError, AssertionError, TypeError) as e:
        raise UserInputError(f"{config_file}: {e}") from None
    if len(opts) % 2:
        raise UserInputError(f"config overrides come in KEY VALUE pairs, got {list(opts)}")
    try:
        cfg.merge_from_list(list(opts))
    except KeyError as e:
        raise UserInputError(f"command line: {_key_error(e)}") from None
    except (ValueError, AssertionError, TypeError) as e:
        raise UserInputError(f"command line: {e}") from None
    if freeze:
        cfg.freeze()
    return cfg


def _key_error(error: KeyError) -> str:
    message = str(error.args[0])
    return message if "renamed" in message else f"{message} (a typo, or a key of another version?)"


def setup_logging(output: str | None = None) -> None:
    """Detectron2's log format for this package, Detectron2 and fvcore (whose checkpointer logs
    what it loads), on the main process."""
    for name, abbrev in (("detr_d2", None), ("detectron2", "d2"), ("fvcore", None)):
        setup_logger(output=output, name=name, abbrev_name=abbrev)


def user_error_message(error: BaseException) -> str | None:
    """The one line to show for a user error, or ``None`` for an unexpected one."""
    if isinstance(error, UserInputError | FileNotFoundError | IsADirectoryError):
        return str(error)  # UserInputError includes unsafe and mismatched checkpoints
    return None


def run(main: Callable, *args) -> int:
    """The exit status of ``main(*args)`` (its int result, else 0); a user error ends with one
    line and status 2."""
    try:
        status = main(*args)
        return status if isinstance(status, int) else 0
    except Exception as e:
        message = user_error_message(e)
        if message is None:
            raise
        tool = os.path.basename(sys.argv[0]) or "tool"
        sys.stderr.write(f"{tool}: error: {message}\n")
        return USER_ERROR_EXIT
