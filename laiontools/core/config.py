"""Typed stage configs: dataclasses, loadable from YAML, overridable by flags, validated, saved as JSON.

Each stage declares ``@dataclass class XConfig(StageConfig)``; :func:`add_config_args` turns its fields
into argparse flags (help from ``field(metadata={"help": ...})``) and :func:`config_from_args`
builds the config from ``--config file.yaml`` then the flags actually given. No stage reads a raw
argparse namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from typing import Any, Self, TypeVar

from laiontools.core.errors import UserError

T = TypeVar("T", bound="StageConfig")


class ConfigError(UserError, ValueError):
    """A setting is missing, of the wrong type, or out of range."""


@dataclasses.dataclass
class StageConfig:
    # Settings of another command that one config file may carry for both (``study`` and ``study plan``
    # read one study.yaml): dropped from a --config file, never flags or fields of this one.
    SHARED_FILE_KEYS: typing.ClassVar[frozenset[str]] = frozenset()

    def validate(self) -> None:  # overridden by stages
        """Raise ConfigError if a setting is invalid."""

    def __post_init__(self) -> None:
        self.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names, key=str)
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
        try:
            return cls(**data)
        except TypeError as e:  # a validate() comparing text it did not parse with a number
            raise ConfigError(f"{where}: a setting has the wrong type ({e}); see `--help` for each setting's type") from None

    @classmethod
    def check_types(cls, data: dict[str, Any], where: str) -> None:
        """Raise ConfigError unless every known setting in `data` (read from YAML: never typed by argparse)
        is of its field's type: a quoted "false" is a non-empty string, so a safety switch such as
        allow_private_network would be on. (Flags are typed by argparse or parsed by validate().)"""
        hints = typing.get_type_hints(cls)
        for name, value in data.items():
            if name in hints and not _of_type(value, hints[name]):
                raise ConfigError(f"{where}: {name} must be {_describe(hints[name])}, got {value!r} ({type(value).__name__})")

    @classmethod
    def typed(cls, data: dict[str, Any], where: str) -> dict[str, Any]:
        """`data` (read from YAML) checked by :meth:`check_types` and given its fields' types, as argparse
        gives a flag's: a number where text belongs is that text (``name: 2024``, ``device: 0``), and a
        number YAML left as text (``lr: 5e-4``, ``spark_above: 1e7``: YAML 1.1 reads an exponent without a
        dot as a string) is that number. Text that is no number, in a number field that does not parse
        text of its own (a sample count's ``80M``: metadata ``count``), is refused naming the setting."""
        cls.check_types(data, where)
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        out = {}
        for name, value in data.items():
            if name not in hints:
                out[name] = value
                continue
            try:
                out[name] = _as_type(value, hints[name], bool(fields[name].metadata.get("count")) if name in fields else False)
            except ValueError:
                raise ConfigError(f"{where}: {name} must be {_describe(hints[name])}, got {value!r} ({type(value).__name__})") from None
        return out


def _as_type(value: Any, tp: Any, count: bool = False) -> Any:
    """`value` (already passed by :func:`_of_type`) converted to `tp` where YAML gave it another type;
    ValueError for text that is no number in a number field (unless `count`: the stage parses it)."""
    tp, _ = _base_type(tp)
    if value is None or tp is Any or tp is bool:
        return value
    if tp in (int, float):
        if isinstance(value, str):
            try:
                n: Any = int(value.strip())
            except ValueError:
                try:
                    n = float(value.strip())
                except ValueError:
                    if count:
                        return value  # "80M", "3B": the stage's validate() parses it
                    raise
            if isinstance(n, float) and (math.isnan(n) or (tp is int and not n.is_integer())):
                raise ValueError(value)
            value = n
        if tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
        return float(value) if tp is float and isinstance(value, int) else value
    if tp is str:
        return value if isinstance(value, str) else str(value)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple) and args and isinstance(value, (list, tuple)):
        return [_as_type(v, args[0], count) for v in value]
    if origin is dict and args and isinstance(value, dict):
        return {_as_type(k, args[0]): _as_type(v, args[1]) for k, v in value.items()}
    return value


def _of_type(value: Any, tp: Any) -> bool:
    """Whether `value` (from YAML) may go to a field annotated `tp`. Strict where a wrong type would
    pass silently: a bool field takes only true/false (a quoted "false" or "no" is a non-empty string,
    so true), and a list or mapping where a scalar belongs (or the reverse) is refused. Numbers also come
    as text that the stage's validate() parses ("80M", "3e9", which YAML leaves a string), so a number
    field takes text; it refuses a bool, a NaN, and a fraction where a whole number belongs."""
    if tp is Any:
        return True
    tp, optional = _base_type(tp)
    if value is None:
        return optional or tp is Any
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp in (int, float):
        if isinstance(value, str):
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        return tp is float or float(value).is_integer()
    if tp is str:
        return isinstance(value, (str, int, float)) and not isinstance(value, bool)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and (not args or all(_of_type(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict) and (not args or all(_of_type(k, args[0]) and _of_type(v, args[1]) for k, v in value.items()))
    return True  # a type this check does not know: the stage's validate() decides


def _describe(tp: Any) -> str:
    tp, optional = _base_type(tp)
    names = {bool: "true or false (unquoted)", int: "a whole number", float: "a number", str: "text"}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in names:
        text = names[tp]
    elif origin in (list, tuple) and args:
        text = f"a list of {_describe(args[0]).removeprefix('a ')}s" if args[0] in (int, float) else f"a list of {_describe(args[0])}"
    elif origin is dict:
        text = "a mapping" + (f" of {_describe(args[0])} to {_describe(args[1])}" if args and args[1] is not Any else "")
    else:
        text = str(tp)
    return text + (" (or null)" if optional else "")


def changed_settings(old: dict[str, Any], new: dict[str, Any], keys: Any) -> str:
    """``"key: old -> new, ..."`` for the `keys` whose values differ between two settings dicts ("" when
    none): what a stage refusing to continue another run's output says. Both are compared as recorded
    (:func:`laiontools.core.redact.redact`): a record holds no credentials, and the same settings with a
    new token are the same run."""
    from laiontools.core.redact import redact

    old, new = redact(old), redact(new)
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, optional?) of an annotation like `int | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


# Keys a stage's settings.json records beside its settings (which stage wrote it, what a run derived):
# a config file may carry them, so that saved settings can be given back with --config; they are ignored.
RECORD_ONLY = ("stage", "clusters_used", "world_size")


def _unique_key_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        """safe_load, but a setting written twice is an error (the parser keeps the last one silently)."""

        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, str) and (key.replace("-", "_") in seen):
                    raise yaml.constructor.ConstructorError(
                        None, None, f"setting {key!r} is given twice (line {key_node.start_mark.line + 1})", key_node.start_mark)
                if isinstance(key, str):
                    seen.add(key.replace("-", "_"))
            return super().construct_mapping(node, deep=deep)

    return Loader


class _Pair(tuple):
    """One NAME=VALUE item of a mapping flag (see :func:`add_config_args`)."""


def _pair(value_type: type) -> Any:
    def parse(text: str) -> _Pair:
        name, eq, value = text.partition("=")
        if not eq or not name.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
        try:
            return _Pair((name.strip(), value_type(value.strip())))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: {value.strip()!r} is not a {value_type.__name__}") from None

    return parse


def add_config_args(parser: argparse.ArgumentParser, cls: type[StageConfig], skip: tuple[str, ...] = ()) -> None:
    """Add one flag per dataclass field (``--field-name``); unspecified flags stay absent."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp, _ = _base_type(hints[f.name])
        # argparse %-formats help strings: a bare "25%" would crash --help ("%%" is accepted as written too)
        help_ = f.metadata.get("help", "").replace("%%", "%").replace("%", "%%")
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_}
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        if default not in (None, [], {}, ""):
            kw["help"] += f" (default: {default})"
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (list, tuple):
            (item,) = typing.get_args(tp)[:1]
            kw["nargs"] = "+"
            # sample counts ("3e9", "13B") as text that the stage's validate() parses, as for one count
            kw["type"] = str if f.metadata.get("count") and item in (int, float) else item
            # `--exclude a --exclude b` is both (the README writes list flags so), not the last one alone
            kw["action"] = "extend"
        elif tp in (int, float, str):
            # a sample count ("3e9", "13B") comes as text that the stage's validate() parses, as from YAML
            kw["type"] = str if f.metadata.get("count") else tp
        elif typing.get_origin(tp) is dict and f.metadata.get("pairs"):
            # a flat mapping (study's scales: name -> manifest) also as `--scales 80M=a.json 400M=b.json`
            value_type = typing.get_args(tp)[1] if typing.get_args(tp)[1] in (int, float, str) else str
            kw.update(nargs="+", action="extend", metavar="NAME=VALUE", type=_pair(value_type))
        elif typing.get_origin(tp) is dict:
            continue  # other mappings only from YAML
        parser.add_argument(flag, **kw)
    parser.add_argument("--config", dest="config_file", default=None, help="YAML file with settings; flags override it")


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build a config from ``--config`` (YAML) then the flags the user gave."""
    data: dict[str, Any] = {}
    cfg_file = getattr(args, "config_file", None)
    if cfg_file:
        import yaml

        from laiontools.core.storage import url_to_fs

        if re.match(r"^spark\.[\w.-]+=", cfg_file):  # argparse took `--conf key=value` for an abbreviation of --config
            raise ConfigError(f"--conf {cfg_file} is a spark-submit flag: give it before the job file "
                              f"(spark-submit --conf {cfg_file} jobs/<stage>.py ...); for laiontools <stage>, spark_conf in a --config YAML file")
        fs, p = url_to_fs(cfg_file)
        if not fs.exists(p):
            raise ConfigError(f"config file {cfg_file} does not exist")
        try:
            with fs.open(p, "r", encoding="utf-8") as f:
                loaded = yaml.load(f, Loader=_unique_key_loader())  # a SafeLoader
            loaded = {} if loaded is None else loaded  # an empty file (or one of comments only): no settings
        except yaml.YAMLError as e:  # cut or damaged YAML: say where, not a parser traceback
            raise ConfigError(f"config file {cfg_file} is not valid YAML ({' '.join(str(e).split())}); fix or rewrite it") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {cfg_file} is not UTF-8 text (byte {e.start}); it is damaged or not a YAML file") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {cfg_file}: expected a mapping of setting: value, got {type(loaded).__name__}")
        odd = [k for k in loaded if not isinstance(k, str)]
        if odd:  # `1: 2`, or YAML 1.1's `on:` / `yes:`, which a YAML parser reads as true
            raise ConfigError(f"config file {cfg_file}: setting names must be text, got {odd[0]!r}; quote it if it is one")
        data.update({k.replace("-", "_"): v for k, v in loaded.items()})
    names = {f.name for f in dataclasses.fields(cls)}
    for k in (*RECORD_ONLY, *cls.SHARED_FILE_KEYS):  # a stage's own settings.json fed back: what it records
        if k not in names:                              # about the run is no setting; nor another command's keys
            data.pop(k, None)
    flags = {k: v for k, v in vars(args).items() if k in names}
    for k, v in flags.items():
        if isinstance(v, list) and v and all(isinstance(x, _Pair) for x in v):  # NAME=VALUE items of a mapping flag
            twice = sorted({a for a, _ in v if [b for b, _ in v].count(a) > 1})
            if twice:
                raise ConfigError(f"--{k.replace('_', '-')}: {', '.join(twice)} given twice")
            flags[k] = {a: b for a, b in v}
    if cfg_file:  # what a flag overrides is not checked (a saved `output: null` given with --output)
        data = cls.typed({k: v for k, v in data.items() if k not in flags}, cfg_file)
    data.update(flags)
    return cls.from_dict(data, where=cfg_file or "flags")
