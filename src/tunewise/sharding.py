"""Sharding: what `training.fsdp` / `training.fsdp_config` and `training.deepspeed` split over the
processes, read and checked before anything loads, and what that does to the memory per device.

Each process of a sharded run holds 1/N of what is sharded (N: the processes that share a shard):

| setting | sharded over the processes |
|---|---|
| ZeRO-1 | optimizer states |
| ZeRO-2, `shard_grad_op`, `hybrid_shard_zero2` | optimizer states and gradients |
| ZeRO-3, `full_shard`, `hybrid_shard` | optimizer states, gradients and weights |

`hybrid_*` shard within one machine (N: its processes) and replicate across machines. Offload keeps a
part in CPU memory instead (FSDP's `offload`/`cpu_offload`: weights, gradients and optimizer;
DeepSpeed's `offload_optimizer`, `offload_param`). Where the weights are sharded, each layer is gathered
whole for its forward and backward, and the next one is prefetched meanwhile: two layers' weights are
added back. The same rules as transformers' own reading of these settings (training_args.py,
`_process_fsdp_args`): `fsdp` as a string or list is split on spaces, `fsdp_config` keys may carry an
`fsdp_` prefix, FSDP2 (the default `version`) reads `reshard_after_forward` as true = full_shard, false =
shard_grad_op, and knows no hybrid strategy. No torch here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FSDP_OPTIONS = (
    "full_shard",
    "shard_grad_op",
    "hybrid_shard",
    "hybrid_shard_zero2",
    "no_shard",
    "offload",
    "auto_wrap",
)
STRATEGY_LEVEL = {
    "full_shard": 3,
    "hybrid_shard": 3,
    "shard_grad_op": 2,
    "hybrid_shard_zero2": 2,
    "no_shard": 0,
}
LEVEL_PARTS = {
    0: (),
    1: ("optimizer",),
    2: ("gradients", "optimizer"),
    3: ("weights", "gradients", "optimizer"),
}
OFF_DEVICE = ("cpu", "nvme")
PREFETCHED_LAYERS = 2  # the layer being computed, gathered whole, and the next one being fetched


@dataclass(frozen=True)
class Sharding:
    """What a run shards, over how many of its processes, and what it keeps off the device."""

    engine: str  # fsdp | deepspeed
    name: str  # full_shard, shard_grad_op, hybrid_shard, ..., ZeRO-1/2/3
    level: int  # 0 nothing, 1 the optimizer, 2 + gradients, 3 + weights
    within_machine: bool = False  # hybrid: over one machine's processes, replicated across machines
    offloaded: tuple[str, ...] = ()  # parts kept in CPU memory (or NVMe)

    @property
    def sharded(self) -> tuple[str, ...]:
        return tuple(p for p in LEVEL_PARTS[self.level] if p not in self.offloaded)

    def over(self, processes: int, machines: int = 1) -> int:
        """The processes that share each shard."""
        return max(processes // max(machines, 1), 1) if self.within_machine else max(processes, 1)


# ----------------------------------------------------------------------------- reading the settings


def read_sharding(training: dict[str, Any]) -> tuple[Sharding | None, list[tuple[str, str]]]:
    """The run's sharding (None when it shards nothing), and its problems as (key, what is wrong + fix)."""
    problems: list[tuple[str, str]] = []
    fsdp = _read_fsdp(training, problems) if training.get("fsdp") else None
    deepspeed = _read_deepspeed(training.get("deepspeed"), problems) if training.get("deepspeed") else None
    if fsdp and deepspeed:
        problems.append(("fsdp", "and training.deepspeed are two sharding engines: keep one"))
    return (None if problems else fsdp or deepspeed), problems


def _json_file(key: str, value: str, problems: list[tuple[str, str]]) -> dict[str, Any] | None:
    """A JSON object from the file a setting names; a missing or broken file is a problem at file:line."""
    path = Path(value).expanduser()
    if not path.is_file():
        problems.append((key, f"is {value!r}: that file does not exist; give the path of a JSON file"))
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        where = f"{value}:{exc.lineno}:{exc.colno}"
        problems.append((key, f"names a file that is not valid JSON: {where}: {exc.msg}; fix that line"))
        return None
    except (OSError, UnicodeDecodeError) as exc:
        problems.append((key, f"is {value!r}: cannot read it ({exc})"))
        return None
    if not isinstance(data, dict):
        problems.append((key, f"is {value!r}: expected a JSON object, got {type(data).__name__}"))
        return None
    return data


def _mapping(key: str, value: Any, problems: list[tuple[str, str]]) -> dict[str, Any] | None:
    """A setting that is a mapping or the path of a JSON file holding one."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        return _json_file(key, value, problems)
    problems.append((key, f"is {value!r}: expected a mapping or the path of a JSON file"))
    return None


def _read_fsdp(training: dict[str, Any], problems: list[tuple[str, str]]) -> Sharding | None:
    """`training.fsdp` (true, or options as a string or list) with `training.fsdp_config`."""
    raw = training["fsdp"]
    items = raw.split() if isinstance(raw, str) else [str(x) for x in raw] if isinstance(raw, list) else []
    if raw is not True and not isinstance(raw, str | list):
        problems.append(("fsdp", f"is {raw!r}: write true, or options such as 'full_shard auto_wrap'"))
        return None
    config = {}
    if training.get("fsdp_config"):
        config = _mapping("fsdp_config", training["fsdp_config"], problems) or {}
    config = {k.removeprefix("fsdp_"): v for k, v in config.items()}
    unknown = [x for x in items if x.lower() not in FSDP_OPTIONS]
    if unknown:
        problems.append(
            (
                "fsdp",
                f"is {raw!r}: {', '.join(map(repr, unknown))} is not an FSDP option; valid: "
                f"{', '.join(FSDP_OPTIONS)} (e.g. training.fsdp='full_shard auto_wrap')",
            )
        )
        return None
    version = config.get("version", 2)
    strategies = [x.lower() for x in items if x.lower() in STRATEGY_LEVEL]
    if len(strategies) > 1:
        problems.append(("fsdp", f"is {raw!r}: one sharding strategy at a time ({', '.join(strategies)})"))
        return None
    strategy = strategies[0] if strategies else _strategy_of_config(config, version)
    if str(version) != "1" and strategy.startswith("hybrid"):
        problems.append(
            (
                "fsdp",
                f"is {raw!r}: {strategy} exists only in FSDP1; FSDP2 (transformers' default) shards "
                "full_shard or shard_grad_op: use one of those, or training.fsdp_config.version=1",
            )
        )
        return None
    offload = "offload" in [x.lower() for x in items] or _truthy(config.get("cpu_offload"))
    return Sharding(
        "fsdp",
        strategy,
        STRATEGY_LEVEL.get(strategy, 3),
        within_machine=strategy.startswith("hybrid"),
        offloaded=("weights", "gradients", "optimizer") if offload else (),
    )


def _strategy_of_config(config: dict[str, Any], version: Any) -> str:
    """The strategy `fsdp_config.reshard_after_forward` names (FSDP2: a bool; FSDP1: a strategy name)."""
    reshard = config.get("reshard_after_forward", True if str(version) != "1" else "full_shard")
    if isinstance(reshard, str) and reshard.lower() in STRATEGY_LEVEL:
        return reshard.lower()
    return "full_shard" if _truthy(reshard) else "shard_grad_op"


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() in ("true", "1", "yes")


def _read_deepspeed(value: Any, problems: list[tuple[str, str]]) -> Sharding | None:
    """`training.deepspeed`: a DeepSpeed config (a mapping or a JSON file) and its ZeRO stage."""
    config = _mapping("deepspeed", value, problems)
    if config is None:
        return None
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        problems.append(
            (
                "deepspeed",
                f"{_whose(value)} zero_optimization.stage is {stage!r}: ZeRO stages are 0, 1, 2 or 3",
            )
        )
        return None
    offloaded = []
    if _device(zero.get("offload_optimizer")) in OFF_DEVICE:
        offloaded.append("optimizer")
    if _device(zero.get("offload_param")) in OFF_DEVICE:
        if stage != 3:
            problems.append(
                (
                    "deepspeed",
                    f"{_whose(value)} zero_optimization has offload_param at stage {stage}: DeepSpeed "
                    "offloads the weights only at stage 3; set stage 3 or remove offload_param",
                )
            )
            return None
        offloaded.append("weights")
    return Sharding("deepspeed", f"ZeRO-{stage}", stage, offloaded=tuple(offloaded))


def _whose(value: Any) -> str:
    """How a problem inside a DeepSpeed config begins: the file it is in, or the inline mapping."""
    return f"names {value}, whose" if isinstance(value, str) else "has a mapping whose"


def _device(section: Any) -> str | None:
    return str(section.get("device", "none")).lower() if isinstance(section, dict) else None


# ----------------------------------------------------------------------------- the memory per device


def shard_memory(
    mem: dict[str, Any], sharding: Sharding, processes: int, machines: int = 1, layers: int = 1
) -> dict[str, Any]:
    """The memory estimate per device of a sharded run (`mem`: `plan.estimate_memory`'s parts).

    Each sharded part is 1/N, each offloaded part 0; where the weights are sharded or offloaded, two of
    the `layers` are gathered back whole. Every peak is lowered by the same amount (they all hold these
    fixed parts). The unsharded numbers stay under `sharding`.
    """
    n = sharding.over(processes, machines)
    parts = {
        "weights": mem["weights"] + mem["adapter"],
        "gradients": mem["gradients"],
        "optimizer": mem["optimizer"],
    }
    per_device = dict(parts)
    for part in sharding.sharded:
        per_device[part] = parts[part] / n
    for part in sharding.offloaded:
        per_device[part] = 0
    gathered = 0.0
    if sharding.level == 3 and (n > 1 or "weights" in sharding.offloaded):
        gathered = min(parts["weights"], PREFETCHED_LAYERS * parts["weights"] / max(layers, 1))
    saved = sum(parts.values()) - sum(per_device.values()) - gathered
    out = dict(mem)
    scale = per_device["weights"] / parts["weights"] if parts["weights"] else 1.0
    out["weights"] = int(mem["weights"] * scale + gathered)
    out["adapter"] = int(mem["adapter"] * scale)
    out["gradients"], out["optimizer"] = int(per_device["gradients"]), int(per_device["optimizer"])
    for key in ("peak_step_1", "peak", "peak_with_checkpointing", "peak_without_checkpointing"):
        out[key] = int(mem[key] - saved)
    out["sharding"] = {
        "engine": sharding.engine,
        "name": sharding.name,
        "processes": n,
        "sharded": list(sharding.sharded),
        "offloaded": list(sharding.offloaded),
        "gathered_bytes": int(gathered),
        "unsharded_peak": int(mem["peak"]),
        "peak": out["peak"],
        "unsharded_parts": {k: int(v) for k, v in parts.items()},
    }
    return out


def sharding_line(sharding: dict[str, Any]) -> str:
    """One line: what the sharding changes per device, e.g. "full_shard over 8 processes: weights+
    gradients+optimizer 1/8 each: 14.2 GiB -> 3.1 GiB per device"."""
    n, sharded, offloaded = sharding["processes"], sharding["sharded"], sharding["offloaded"]
    what = []
    if sharded:
        what.append(f"{'+'.join(sharded)} 1/{n} each")
    if offloaded:
        what.append(f"{'+'.join(offloaded)} in CPU memory")
    if not what:
        what.append("nothing sharded (every process holds everything, as in DDP)")
    before, after = sharding["unsharded_peak"] / 2**30, sharding["peak"] / 2**30
    change = f"{before:.1f} GiB -> {after:.1f} GiB per device"
    return f"{sharding['name']} over {n} processes: {', '.join(what)}: {change}"
