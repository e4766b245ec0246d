"""What every experiment script does around its one tx call: parse the flags first and refuse
a bad one in one line (an unknown ``--config.*`` field with the nearest names, a bad value, an
unknown built-in config), read ``--config=tx:NAME[:ARG]`` as the installed ``tx.configs`` file,
show the script's own ``--help`` under its console-script name too, reject stray arguments,
keep Orbax's per-save INFO logs quiet, turn config and checkpoint errors into one line, show
any other error as a traceback trimmed to the user's frames, and exit with
:data:`tx.train.preemption.EXIT_CODE` when a signal stopped a run after saving."""

import contextlib
import difflib
import importlib.resources
import os
import pathlib
import re
import sys
import traceback

import absl
import ml_collections
from absl import app, flags, logging
from ml_collections.config_flags import config_flags  # the module: its parser and flag classes

from tx.train.checkpoint import CheckpointError
from tx.train.configs import ConfigError
from tx.train.preemption import Preempted

PRINT_CONFIG_HELP = ("Print the value tree the config resolves to and every --config.* field "
                     "(path, value, doc), then exit without running anything.")
USAGE_ERROR = 2  # a refused flag: nothing ran


def start(argv) -> None:
    if len(argv) > 1:
        refuse(f"unexpected arguments {argv[1:]}; flags take the form --name=value (see "
               "--help).")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


@contextlib.contextmanager
def one_line_errors(*kinds):
    """Exits with ``error: ...`` on a ConfigError, a CheckpointError (and any of ``kinds``),
    no traceback; a preempted run prints where it stopped and exits with its own code."""
    try:
        yield
    except Preempted as e:
        _leave(str(e), e.exit_code)
    except (ConfigError, CheckpointError, *kinds) as e:
        _leave(f"error: {e}", 1)


def _leave(line: str, code: int) -> None:
    """Prints ``line`` and exits now. ``os._exit``: a failed Orbax save can leave non-daemon
    threads behind that would keep the interpreter alive; everything of ours is already
    closed and flushed by the time an error gets here."""
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def refuse(line: str) -> None:
    """A usage error: ``error: <line>`` on stderr and exit 2, before anything ran."""
    print(f"error: {line}", file=sys.stderr, flush=True)
    sys.exit(USAGE_ERROR)


def required(holder: flags.FlagHolder, what: str):
    """The value of a flag that must be given (checked in ``main``, so that ``--help`` and
    ``--print_config`` work without it)."""
    if holder.value in (None, ""):
        refuse(f"--{holder.name} is required: {what}")
    return holder.value


def print_config(config) -> None:
    """``--print_config``: the resolved value trees and every field (tx.train.describe)."""
    from tx.train import describe
    if config is None:
        refuse("--print_config needs a config: give --config=<file.py or tx:NAME> "
               f"({_builtin_list()}).")
    with one_line_errors():
        text = describe.render(config)
    print(text)


# ------------------------------------------------------------------------ built-in configs
BUILTIN = "tx:"


def builtin_configs() -> dict[str, pathlib.Path]:
    """The configs installed with tx (``configs/*.py`` as the package ``tx.configs``)."""
    root = importlib.resources.files("tx.configs")
    return {p.name[:-3]: pathlib.Path(str(p)) for p in root.iterdir()
            if p.name.endswith(".py") and not p.name.startswith("_")}


def _builtin_list() -> str:
    return "built-in: " + ", ".join(BUILTIN + n for n in sorted(builtin_configs()))


def config_file(value: str) -> str:
    """``tx:NAME[:ARG]`` as ``<path of the installed NAME.py>[:ARG]``; other values as given."""
    if not value.startswith(BUILTIN):
        return value
    name, colon, arg = value[len(BUILTIN):].partition(":")
    known = builtin_configs()
    if name not in known:
        raise ValueError(f"no built-in config {name!r}; {_builtin_list()} (or a path to a "
                         "config .py file).")
    return f"{known[name]}{colon}{arg}"


class _ConfigFileError(Exception):
    """An error a config file raised while building its config: shown as a traceback."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def _raised_in(error: BaseException) -> str:
    """The file of the innermost frame of ``error``'s traceback."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename) if tb is not None else ""


class _ConfigFileParser(config_flags.ConfigFileFlagParser):
    """``--config``: also reads ``tx:NAME[:ARG]``; refuses a missing file or a config's own
    ``ValueError`` in one line; any other error of a config file becomes a
    :class:`_ConfigFileError` (a traceback), never a flag error. Keeps the config it loaded,
    whose field names an unknown ``--config.*`` override is checked against."""

    config = None

    def parse(self, path):
        path = config_file(path)
        file = path.split(":", 1)[0]
        if not os.path.isfile(file):
            raise ValueError(f"no such file; give a config .py file or tx:NAME "
                             f"({_builtin_list()}).")
        try:
            config = super().parse(path)
        except (TypeError, ValueError) as e:
            # ml_collections re-raises these with the traceback as text; the original is
            # the context. A config's own ValueError (or get_config's arguments) is a refusal.
            original = e.__context__ or e
            where = _raised_in(original)
            if isinstance(original, ConfigError) or (
                    isinstance(original, ValueError) and where == os.path.abspath(file)) or (
                    isinstance(original, TypeError) and where.startswith(_HIDDEN)
                    and "get_config()" in str(original)):
                raise ValueError(str(original).split("\n")[0]) from None
            raise _ConfigFileError(original) from None
        except Exception as e:  # the config file's own error: a traceback
            raise _ConfigFileError(e) from None
        if type(config).__name__ == "_ErrorConfig":  # an OSError, kept for later by ml_collections
            raise _ConfigFileError(vars(config)["_error"])
        self.config = config
        return config


# ------------------------------------------------------------------------ unknown fields
def _initials(name: str) -> str:
    return "".join(w[0] for w in name.split("_") if w)


def nearest(name: str, candidates) -> list[str]:
    """The candidates a mistyped ``name`` most likely means: same initials (``lr`` ->
    ``learning_rate``), a prefix, then the closest spellings."""
    candidates = sorted(candidates)
    near = [c for c in candidates if _initials(c) == name]
    near += [c for c in candidates if c.startswith(name)]
    near += difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    if len(name) >= 3:
        near += [c for c in candidates if name in c]
    return list(dict.fromkeys(near))[:4]


def unknown_field(config, path: str) -> str | None:
    """The one-line refusal of ``--config.<path>`` when ``path`` is no field of ``config``;
    ``None`` when it is one."""
    node, parts = config, path.split(".")
    for i, part in enumerate(parts):
        where = ".".join(["config", *parts[:i]])
        if not isinstance(node, ml_collections.ConfigDict):
            return (f"--config.{path}: no such field; {where} is a {type(node).__name__} "
                    "value, not a section.")
        if part not in node:
            near = nearest(part, node.keys())
            if near:
                return f"--config.{path}: no such field; did you mean: {', '.join(near)}?"
            if not node.keys():
                return (f"--config.{path}: no such field; {where} has no fields in this "
                        "config (a dataset option must be one its dataset takes).")
            return (f"--config.{path}: no such field; the fields of {where} are: "
                    f"{', '.join(sorted(node.keys()))}.")
        node = node[part]
    return None


_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")


def _override_error(argv) -> str | None:
    """The refusal of the first ``--config.*`` override that names no field (after
    ml_collections failed on one)."""
    parser = getattr(flags.FLAGS["config"], "parser", None) if "config" in flags.FLAGS \
        else None
    config = getattr(parser, "config", None)
    if config is None:
        return None
    try:
        args = flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
    except flags.Error:
        args = argv[1:]
    for arg in args:
        match = _OVERRIDE.match(arg)
        line = match and unknown_field(config, match.group(1))
        if line:
            return line
    return None


def _flag_error(error: flags.Error) -> str:
    if isinstance(error, flags.UnrecognizedFlagError) and \
            (error.flagname or "").startswith("config."):
        return (f"--{error.flagname}: give --config=<file.py or tx:NAME> first "
                f"({_builtin_list()}).")
    message = str(error)
    return message[len("flag "):] if message.startswith("flag --") else message


# ------------------------------------------------------------------------ tracebacks
_HIDDEN = tuple(os.path.dirname(m.__file__) + os.sep for m in (absl, ml_collections))


def _trim(te: traceback.TracebackException) -> None:
    frames = [f for f in te.stack
              if not f.filename.startswith(_HIDDEN) and f.filename != __file__]
    if frames:
        te.stack = traceback.StackSummary.from_list(frames)
    for inner in (te.__cause__, te.__context__):
        if inner is not None:
            _trim(inner)


def print_traceback(error: BaseException) -> None:
    """Python's traceback of ``error`` without absl's, ml_collections' and this file's
    frames: it ends at the user's file and line."""
    te = traceback.TracebackException.from_exception(error)
    _trim(te)
    sys.stderr.write("".join(te.format()))
    sys.stderr.flush()


# ------------------------------------------------------------------------ the entry point
def _help_as(script) -> None:
    """``--help`` of a console script (``tx-train``) shows the script's doc and flags: absl
    shows the doc of ``__main__`` and the key flags of the module named ``sys.argv[0]``."""
    main_name = sys.argv[0]
    owner = main_name if script.__name__ == "__main__" else script.__name__
    if owner != main_name:
        for flag in flags.FLAGS.get_key_flags_for_module(owner):
            flags.FLAGS.register_key_flag_for_module(main_name, flag)
    main_module = sys.modules.get("__main__")
    if main_module is not None and main_module is not script and not main_module.__doc__:
        main_module.__doc__ = script.__doc__


def _config_given(argv) -> bool:
    expanded = flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
    return any(re.match(r"^--?config(=|$)", a) for a in expanded)


def parse_flags(argv: list[str], default_config: str | None = None) -> list[str]:
    """Parses the flags before ``main`` (``--help`` included): a bad flag is refused in one
    line; an error of the config file itself shows its traceback."""
    app.define_help_flags()
    if "config" in flags.FLAGS and config_flags.is_config_flag(flags.FLAGS["config"]):
        flag = flags.FLAGS["config"]
        if not isinstance(flag.parser, _ConfigFileParser):
            flag.parser = _ConfigFileParser(flag.parser.name,
                                            getattr(flag.parser, "_lock_config", True))
    try:
        if default_config and not _config_given(argv):
            # In place: ml_collections reads its --config.* overrides from sys.argv.
            argv.insert(1, f"--config={default_config}")
        return flags.FLAGS(argv)
    except _ConfigFileError as e:
        print_traceback(e.error)
        sys.exit(1)
    except flags.Error as e:
        refuse(_flag_error(e))
    except Exception:  # only a --config.* field that does not exist is a flag error
        line = _override_error(argv)
        if line is None:
            raise
        refuse(line)


def run(main, *, default_config: str | None = None) -> None:
    """Runs ``main`` under absl with the flags parsed by :func:`parse_flags` (``default_config``:
    the ``--config`` when none is given, e.g. ``tx:ablation``)."""
    script = sys.modules[main.__module__]
    _help_as(script)
    args = parse_flags(sys.argv, default_config)
    try:
        app.run(main, flags_parser=lambda _: args)
    except Exception as e:  # a bug: its traceback, trimmed
        print_traceback(e)
        sys.exit(1)
