"""Run a FedScale job file (``conf.yml``) as a fedfleet job: ``fedfleet simulate --from-fedscale conf.yml``.

The ``job_conf`` list is translated key by key through the tables in :mod:`fedfleet.config.fedscale_keys`;
keys a job leaves out take FedScale's defaults, so the translated job is the one FedScale would have run
(as far as fedfleet has the same parts). Then, in order:

1. the conf's optional top-level ``fedfleet:`` section, fedfleet keys for what FedScale's file cannot say
   (generated traces, an optimizer, ``client.keep_local``), merged over the translation; FedScale's driver
   ignores top-level keys it does not know, so the file still runs under FedScale;
2. ``--set key=value`` overrides (fedfleet keys), as for any job file.

An unknown key is an error naming the closest known one; a known key that has no meaning in fedfleet (the
parameter server's address, loader workers) is a warning that says why, and so is one that fedfleet applies
with a difference (FedScale's FedBuff normalises its buffer otherwise); a dataset or model fedfleet cannot
provide offline is an error that lists what it can. ``FedScaleImport.to_yaml()`` is the translated job as a
fedfleet job file, for users who switch.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedfleet.config import fedscale_keys as keys
from fedfleet.config.fedscale_read import job_conf_of, read_conf, replaced_sections, unknown_keys
from fedfleet.config.imports import import_user_modules
from fedfleet.config.loader import PROBLEMS_SEP, apply_overrides, parse
from fedfleet.config.schema import DataConfig, FedBuffConfig, JobConfig
from fedfleet.errors import ConfigError

# the order in which sections appear in the printed job file (as in examples/*.yaml)
_ORDER = ("name", "seed", "rounds", "cohort", "eval_every", "selector", "data", "model", "strategy", "client",
          "runtime", "system", "fedbuff", "output")  # fmt: skip


class FedScaleKeyWarning(UserWarning):
    """FedScale keys that a fedfleet simulation does not use (the message names them and says why)."""


@dataclass(frozen=True)
class FedScaleImport:
    """A FedScale job file as a fedfleet job, with what became of each key."""

    job: JobConfig
    data: dict[str, Any]  # the fedfleet job file (plain YAML data) that ``job`` is parsed from
    source: Path
    mapped: tuple[tuple[str, str], ...]  # (FedScale key and value, what it became), in the file's order
    ignored: tuple[tuple[str, str], ...]  # (FedScale key, why it does not apply)
    notes: tuple[str, ...] = ()  # substitutions worth knowing (e.g. the dataset fedfleet uses instead)
    differs: tuple[tuple[str, str], ...] = ()  # (FedScale key, how fedfleet's counterpart differs)
    extension: bool = False  # the conf has a `fedfleet:` section (merged over the translation)
    overrides: tuple[str, ...] = ()  # --set overrides applied last

    def warning(self) -> str | None:
        """One message naming the keys that do not apply, grouped by reason, and the keys applied with a
        difference; None when every key applied as in FedScale."""
        blocks = []
        if self.ignored:
            lines = "".join(f"\n  {line}" for line in self._ignored_lines())
            blocks.append(f"FedScale keys that do not apply to a fedfleet simulation (ignored):{lines}")
        if self.differs:
            lines = "".join(f"\n  {key}: {what}" for key, what in self.differs)
            blocks.append(f"FedScale keys applied, but not exactly as FedScale applies them:{lines}")
        return "\n".join(f"{self.source}: {block}" for block in blocks) or None

    def _ignored_lines(self) -> list[str]:
        by_reason: dict[str, list[str]] = {}
        for key, reason in self.ignored:
            by_reason.setdefault(reason, []).append(key)
        return [f"{', '.join(names)}: {reason}" for reason, names in by_reason.items()]

    def to_yaml(self) -> str:
        """The translated job as a fedfleet job file, with the translation as comments above it."""
        head = [f"# fedfleet job translated from the FedScale job file {self.source}", "# FedScale key -> fedfleet:"]
        head += [f"#   {source} -> {target}" for source, target in self.mapped]
        if self.ignored:
            head.append("# not applied:")
            head += [f"#   {line}" for line in self._ignored_lines()]
        if self.differs:
            head.append("# applied with a difference:")
            head += [f"#   {key}: {what}" for key, what in self.differs]
        head += [f"# note: {note}" for note in self.notes]
        if self.extension:
            head.append("# then the conf's `fedfleet:` section, merged over the above")
        if self.overrides:
            head.append(f"# then --set {' --set '.join(self.overrides)}")
        return "\n".join(head) + "\n" + yaml.safe_dump(self.data, sort_keys=False, default_flow_style=None)


def from_fedscale(path: str | Path, overrides: list[str] | None = None, *, warn: bool = True) -> FedScaleImport:
    """Translate FedScale's ``conf.yml`` at ``path`` (then ``--set`` style ``overrides``) into a fedfleet job.

    Emits one :class:`FedScaleKeyWarning` for keys that do not apply (``warn=False``: only in the report).
    Raises :class:`ConfigError` for unknown keys, bad values and datasets or models fedfleet cannot provide.
    """
    path = Path(path)
    conf = read_conf(path)
    job_conf = job_conf_of(conf, path)
    unknown = unknown_keys(job_conf)
    job_conf = {k: v for k, v in job_conf.items() if k not in dict(unknown)}
    extension = conf.get(keys.EXTENSION)
    if extension is not None and not isinstance(extension, dict):
        raise ConfigError(f"{path}: the `fedfleet:` section must be a mapping of fedfleet keys, got {extension!r}")
    translation = _Translation(job_conf, path, conf.get("aggregator_entry"), replaced=replaced_sections(extension))
    data = translation.run()
    if extension is not None:
        data = _merge(data, extension)
        translation.drop_replaced_choices(extension)
    translation.fill_sgd_client(data)
    data = apply_overrides(data, list(overrides or []))
    if isinstance(data.get("imports"), list):  # the `fedfleet:` section's modules: the user's models and datasets
        import_user_modules(data["imports"], near=path)
    for finish in (translation.finish_data, translation.finish_system, translation.finish_async):
        translation.attempt(finish, data)
    top = [key for key in conf if key in keys.TOP_LEVEL_IGNORED and key not in translation.top_level_used]
    ignored = [(key, keys.IGNORED[key]) for key in top] + translation.ignored + unknown
    data = {k: data[k] for k in (*_ORDER, *data) if k in data}  # sections in the usual order
    try:
        job = parse(JobConfig, copy.deepcopy(data))
    except ConfigError as exc:
        translation.errors += [f"{p}{translation.origin_of(p)}" for p in _schema_problems(exc, translation.errors)]
    if translation.errors:
        raise ConfigError(_all_problems(path, translation.errors)) from None
    report = FedScaleImport(
        job,
        data,
        path,
        tuple(translation.mapped),
        tuple(ignored),
        tuple(translation.notes),
        tuple(translation.differs),
        extension=extension is not None,
        overrides=tuple(overrides or ()),
    )
    message = report.warning()
    if warn and message is not None:
        warnings.warn(message, FedScaleKeyWarning, stacklevel=2)
    return report


# -- translating -----------------------------------------------------------------------------------
class _Translation:
    """One pass over the tables; records what each key became (``mapped``) or why it does not apply."""

    def __init__(
        self, job_conf: dict[str, Any], path: Path, aggregator_entry: Any = None, replaced: frozenset[str] = frozenset()
    ) -> None:
        self.given = job_conf
        self.path = path
        self.replaced = replaced  # fedfleet keys the `fedfleet:` section sets itself: their FedScale source may be
        # one fedfleet cannot translate (data_set: taobao beside a csv dataset of the user's)
        self.aggregator_entry = aggregator_entry  # conf.yml's top level: FedScale's switch to asynchronous FL
        self.data: dict[str, Any] = {}
        self.values: dict[str, Any] = {}  # converted values (given or FedScale's default), for derived params
        self.mapped: list[tuple[str, str]] = []
        self.ignored: list[tuple[str, str]] = []
        self.notes: list[str] = []
        self.differs: list[tuple[str, str]] = []
        self.top_level_used: set[str] = set()  # top-level keys that the translation read (aggregator_entry)
        self.targets: dict[str, str] = {}  # fedfleet key -> the FedScale key it came from (for error messages)
        self.overcommit = 0.0
        self._overcommit_given = False
        self.errors: list[str] = []  # every problem of the file, reported together (one run, not one per problem)

    def attempt(self, step: Callable[..., None], *args: Any) -> None:
        """Run one translation step; its ConfigError is kept and the other steps still run."""
        try:
            step(*args)
        except ConfigError as exc:
            self.errors.append(str(exc))

    def run(self) -> dict[str, Any]:
        for key, spec in keys.DIRECT.items():
            self.attempt(self._direct, key, spec)
        for key, spec in keys.CHOICES.items():
            self.attempt(self._choice, key, spec)
        for step in (self._dataset, self._system, self._async):
            self.attempt(step)
        self.ignored += [(key, keys.IGNORED[key]) for key in self.given if key in keys.IGNORED]
        order = list(self.given)  # report in the file's order; defaults (not in the file) last
        self.mapped.sort(key=lambda m: order.index(m[0].split(":")[0]) if m[0].split(":")[0] in order else len(order))
        self.ignored.sort(key=lambda m: order.index(m[0]) if m[0] in order else len(order))
        return self.data

    # each step reads its keys, converts them, and writes fedfleet keys
    def _value(self, key: str, convert: keys.Convert, default: Any) -> tuple[Any, bool]:
        """The converted value and whether the file gave it (else FedScale's ``default``, or None)."""
        if key in self.given and self.given[key] is not None:
            value = convert(key, self.given[key])
            self.values[key] = value
            return value, True
        if default is not None:
            self.values[key] = default
        return default, False

    def _set(self, target: str, value: Any, source: str) -> None:
        node = self.data
        *parents, last = target.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
        self.targets[target] = source

    def _record(self, key: str, value: Any, given: bool, became: str) -> None:
        shown = self.given[key] if given and key in self.given else value  # as the file wrote it
        self.mapped.append((f"{key}: {shown}" + ("" if given else " (FedScale's default)"), became))

    def _direct(self, key: str, spec: keys.Direct) -> None:
        value, given = self._value(key, spec.convert, spec.default)
        if value is None:
            return
        self._set(spec.target, value, key)
        self._record(key, value, given, f"{spec.target}: {value}")

    def _choice(self, key: str, spec: keys.ChoiceKey) -> None:
        raw = self.given.get(key)
        picked = str(raw) if raw is not None else spec.default
        if picked is None:
            raise ConfigError(
                f"{self.path}: job_conf has no {key!r} ({spec.missing}); set one of: {', '.join(spec.table)}"
            )
        choice = spec.table.get(picked) or spec.table.get(picked.lower())
        if choice is None:
            why = f" ({spec.unavailable})" if spec.unavailable else ""
            raise ConfigError(
                f"{self.path}: job_conf {key}: {picked!r} is not available in fedfleet"
                f"{_hint(picked, list(spec.table))}; available: {', '.join(spec.table)}{why}"
            )
        params: dict[str, Any] = {}
        for param_key, param in choice.params.items():
            value, given = self._value(param_key, param.convert, param.default)
            if (value is not None or given) and param.target is not None:
                params[param.target] = value
                self.targets[f"{spec.target}.{param.target}"] = param_key
                self._record(param_key, value, given, f"{spec.target}.{param.target}: {value}")
        self._record(key, picked, raw is not None, f"{spec.target}: {choice.name}")
        if choice.derive is not None:
            derived = choice.derive(self.values)
            params.update(derived)
            for name, value in derived.items():
                self.targets[f"{spec.target}.{name}"] = key
                self.mapped.append((f"{key}: {picked} (derived)", f"{spec.target}.{name}: {value}"))
        self.data[spec.target] = {"name": choice.name, **params}
        self.targets[spec.target] = key
        if choice.note:
            self.notes.append(f"{key} {picked}: {choice.note}")
        # parameters of the other choices of this key do not apply to this job
        for choice_other in spec.table.values():
            if choice_other is choice:
                continue
            for param_key in choice_other.params:
                if param_key in self.given and param_key not in choice.params:
                    users = [v for v, c in spec.table.items() if param_key in c.params]
                    reason = f"applies to {key}: {' / '.join(users)} only (this job: {picked})"
                    if (param_key, reason) not in self.ignored:
                        self.ignored.append((param_key, reason))

    def _dataset(self) -> None:
        raw = self.given.get("data_set")
        if "data.dataset" in self.replaced:
            if raw is not None:
                self.ignored.append(("data_set", f"{raw}: replaced by the dataset of the `fedfleet:` section"))
            return
        if raw is None:
            raise ConfigError(
                f"{self.path}: job_conf has no data_set (FedScale's default, cifar10, is a download); "
                f"{keys.DATASET_HINT}"
            )
        name = str(raw)
        choice = keys.DATASETS.get(name) or keys.DATASETS.get(name.lower())
        if choice is None:
            why = keys.UNAVAILABLE_DATASETS.get(name.lower(), "fedfleet downloads nothing at run time")
            raise ConfigError(f"{self.path}: job_conf data_set {name!r} is not available: {why}; {keys.DATASET_HINT}")
        self.data["data"] = dict(choice.data)
        self.targets["data"] = "data_set"
        self.mapped.append((f"data_set: {name}", f"data: {_flow(choice.data)}"))
        if choice.note:
            self.notes.append(f"data_set {name}: {choice.note}")

    def _system(self) -> None:
        conf_file = self._path("device_conf_file")
        avail_file = self._path("device_avail_file")
        if avail_file is not None and conf_file is None:
            raise ConfigError(
                f"{self.path}: device_avail_file needs device_conf_file too (fedfleet's FedScale traces take the "
                f"device speeds from it); add it, or drop device_avail_file"
            )
        ratio, given = self._value("overcommitment", keys.to_float, keys.OVERCOMMITMENT_DEFAULT)
        self.overcommit = keys.fraction_minus_one("overcommitment", ratio)
        self._overcommit_given = given
        if conf_file is not None:
            traces = {"name": "fedscale", "device_conf_file": conf_file}
            if avail_file is not None:
                traces["device_avail_file"] = avail_file
            self.data["system"] = {"traces": traces}
            self.targets["system.traces"] = "device_conf_file"
            source = f"device_conf_file: {self.given['device_conf_file']}"
            self.mapped.append((source, f"system.traces: {_flow(traces)}"))
            if avail_file is not None:
                self.mapped.append((f"device_avail_file: {self.given['device_avail_file']}", "(in system.traces)"))

    def _path(self, key: str) -> str | None:
        raw = self.given.get(key)
        if raw is None:
            return None
        text = os.path.expanduser(os.path.expandvars(keys.to_text(key, raw)))
        if "$" in text:
            raise ConfigError(
                f"{self.path}: job_conf {key}: {raw!r} names an environment variable that is not set "
                f"(e.g. FEDSCALE_HOME); set it, or write the path out"
            )
        path = Path(text)
        return str(path if path.is_absolute() else (self.path.parent / path))  # relative to conf.yml's folder

    def _async(self) -> None:
        """FedScale's FedBuff: a fedbuff section with its concurrency, buffer, staleness cut-off and weighting."""
        mode, _ = self._value(keys.ASYNC_MODE, keys.to_bool, None)
        entry = self.aggregator_entry
        by_entry = isinstance(entry, str) and keys.ASYNC_ENTRY.search(entry.strip()) is not None
        if not mode and not by_entry:
            if mode is False:
                self._record(keys.ASYNC_MODE, mode, True, "synchronous rounds (no fedbuff section)")
            self.ignored += [(key, keys.ASYNC_ONLY) for key in keys.ASYNC if key in self.given]
            return
        section: dict[str, Any] = {}
        for key, spec in keys.ASYNC.items():
            value, given = self._value(key, spec.convert, spec.default)
            if value is not None:
                section[spec.target.split(".", 1)[1]] = value
                self.targets[spec.target] = key
                self._record(key, value, given, f"{spec.target}: {value}")
        if "buffer" not in section:  # FedScale's FedBuff aggregator folds num_participants arrivals per round
            section["buffer"] = self.values["num_participants"]
            self.targets["fedbuff.buffer"] = "num_participants"
            given = "num_participants" in self.given
            self._record("num_participants", section["buffer"], given, f"fedbuff.buffer: {section['buffer']}")
        section.update(copy.deepcopy(keys.ASYNC_FIXED))
        order = [f.name for f in dataclasses.fields(FedBuffConfig)]  # as a fedfleet job file writes them
        self.data["fedbuff"] = {k: section[k] for k in sorted(section, key=order.index)}
        key = keys.ASYNC_MODE if mode else "aggregator_entry"
        if by_entry:
            self.top_level_used.add("aggregator_entry")  # read here: not a cluster key that does not apply
        shown = f"{key}: {self.given[key] if mode else entry}"
        self.mapped.append((shown, f"fedbuff: {_flow(keys.ASYNC_FIXED)} (FedScale's FedBuff)"))
        self.targets["fedbuff"] = key
        self.differs.append((key, keys.ASYNC_DIFFERS))

    def drop_replaced_choices(self, extension: Mapping[str, Any]) -> None:
        """A `fedfleet:` section naming another entry (``model: {name: my_dlrm}``) replaces the translated one
        whole: the FedScale keys that chose and parameterised it are then reported as replaced, not as applied."""
        for key, spec in keys.CHOICES.items():
            new, old = extension.get(spec.target), self.data.get(spec.target)
            name = new if isinstance(new, str) else new.get("name") if isinstance(new, dict) else None
            if name is None or not isinstance(old, dict) or name == old.get("name"):
                continue
            sources = {key, *(param for choice in spec.table.values() for param in choice.params)}
            self.mapped = [m for m in self.mapped if m[0].split(":")[0] not in sources]
            reason = f"replaced by the `fedfleet:` section's {spec.target}: {name}"
            self.ignored += [(source, reason) for source in self.given if source in sources]
            self.targets = {t: k for t, k in self.targets.items() if t.split(".")[0] != spec.target}

    # steps that run after the `fedfleet:` section and --set overrides, which may change what they depend on
    def finish_data(self, data: dict[str, Any]) -> None:
        """filter_less / filter_more bound a natural partition's clients; other partitions size clients themselves."""
        given = {key: self.given[key] for key in keys.DATA_FILTERS if self.given.get(key) is not None}
        if not given:
            return
        section = data.get("data")
        partition = section.get("partition") if isinstance(section, dict) else None
        partition = DataConfig().partition.name if partition is None else partition
        name = partition.get("name") if isinstance(partition, dict) else partition
        if name != "natural" or not isinstance(section, dict):
            self.ignored += [(key, keys.NATURAL_ONLY.format(name=name)) for key in given]
            return
        params = dict(partition) if isinstance(partition, dict) else {"name": name}
        for key, raw in given.items():
            spec = keys.DATA_FILTERS[key]
            param = spec.target.rsplit(".", 1)[1]
            if param in params:  # the `fedfleet:` section or --set gave its own bound
                self.ignored.append((key, f"the `fedfleet:` section or --set gives {spec.target} itself"))
                continue
            params[param] = spec.convert(key, raw)
            self.targets[spec.target] = key
            self._record(key, params[param], True, f"{spec.target}: {params[param]} (clients outside are left out)")
        section["partition"] = params

    def fill_sgd_client(self, data: dict[str, Any]) -> None:
        """FedScale's client optimizer (SGD, momentum 0.9, weight decay 5e-4), unless the job chose another."""
        client = data.setdefault("client", {})
        if client.get("optimizer", "sgd") != "sgd":
            return
        for name, value in keys.SGD_CLIENT.items():
            if name not in client:
                client[name] = value
                self.mapped.append(("(FedScale's client optimizer)", f"client.{name}: {value}"))

    def finish_system(self, data: dict[str, Any]) -> None:
        """Over-commitment needs simulated devices: from device_conf_file, or traces in the `fedfleet:` section."""
        system = data.get("system")
        if data.get("fedbuff") is not None:  # a server step ends after fedbuff.buffer arrivals, not at a round end
            if self._overcommit_given:
                self.ignored.append(("overcommitment", keys.SYNC_ONLY_OVERCOMMIT))
        elif isinstance(system, dict) and system.get("traces") is not None:
            if "round_end" not in system:
                round_end = {"name": "overcommit", "factor": self.overcommit}
                system["round_end"] = round_end
                self.targets["system.round_end"] = "overcommitment"
                ratio = round(1.0 + self.overcommit, 12)
                self._record("overcommitment", ratio, self._overcommit_given, f"system.round_end: {_flow(round_end)}")
        elif self._overcommit_given:
            self.ignored.append(
                (
                    "overcommitment",
                    "needs simulated devices: give device_conf_file, or traces in the `fedfleet:` section "
                    "(system: {traces: {name: generate}})",
                )
            )

    def finish_async(self, data: dict[str, Any]) -> None:
        """FedScale's max_concurrency against the clients there are (known once the `fedfleet:` section and
        --set have applied): FedScale's default of 100 is lowered to the population, a given value must fit."""
        fedbuff, section = data.get("fedbuff"), data.get("data")
        if not isinstance(fedbuff, dict) or self.targets.get("fedbuff.concurrency") != "max_concurrency":
            return
        clients = section.get("clients", DataConfig.clients) if isinstance(section, dict) else DataConfig.clients
        concurrency = fedbuff.get("concurrency")
        if not isinstance(clients, int) or not isinstance(concurrency, int) or concurrency <= clients:
            return  # clients None: one per user of the dataset, counted when it is read
        if concurrency != self.values["max_concurrency"]:
            return  # set again by the `fedfleet:` section or --set: fedfleet's own check names it
        if "max_concurrency" in self.given:
            raise ConfigError(
                f"{self.path}: job_conf max_concurrency {concurrency} is larger than the {clients} clients "
                f"(data.clients): at most every client trains at once; lower max_concurrency, or raise data.clients "
                f"in the `fedfleet:` section"
            )
        fedbuff["concurrency"] = clients  # every client training at once
        became = f"fedbuff.concurrency: {clients} (all {clients} clients; FedScale's default is more)"
        self.mapped = [(m, became if m.startswith("max_concurrency:") else t) for m, t in self.mapped]

    def origin_of(self, message: str) -> str:
        """' (from FedScale's learning_rate)' when an error names a fedfleet key that a FedScale key set."""
        hits = [t for t in self.targets if re.search(rf"(?<![\w.]){re.escape(t)}(?=[ :])", message)]
        return f" (from FedScale's {self.targets[max(hits, key=len)]})" if hits else ""


def _schema_problems(exc: ConfigError, translation_errors: list[str]) -> list[str]:
    """The schema's problems with the translated job, one each; with translation errors too, not the keys
    missing because a step failed (they would only repeat those errors)."""
    problems = str(exc).split(PROBLEMS_SEP)
    if translation_errors:
        problems = [p for p in problems if "missing required key" not in p]
    return problems


def _all_problems(path: Path, errors: list[str]) -> str:
    """One message, the file named once: its first problem on the first line, the others one per line."""
    prefix = f"{path}: "
    bare = [e[len(prefix) :] if e.startswith(prefix) else e for e in errors]
    head = f"{path} (translated from FedScale)"
    if len(bare) == 1:
        return f"{head}: {bare[0]}"
    return f"{head}: {len(bare)} problems:{PROBLEMS_SEP}" + PROBLEMS_SEP.join(bare)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, section by section; a named section that names another entry replaces it whole."""
    out = dict(base)
    for key, value in extra.items():
        current = out.get(key)
        if isinstance(value, str) and isinstance(current, dict) and "name" in current:
            out[key] = value  # `strategy: fedavg` replaces the translated strategy and its params
        elif isinstance(value, dict) and isinstance(current, dict):
            renamed = "name" in value and "name" in current and value["name"] != current["name"]
            out[key] = dict(value) if renamed else _merge(current, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _hint(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name.lower(), known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _flow(value: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(value), default_flow_style=True, sort_keys=False, width=math.inf).strip()
