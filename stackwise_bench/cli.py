"""``key=value`` command lines for the entrypoints that are not Hydra apps (``evaluate``, ``analyze``).

Hydra's override grammar rejects an ``=`` inside a value (``baseline=precision=fp32``,
``checkpoint=multirun/AugmFP16/seed=42``); ``OmegaConf.from_dotlist`` splits each
argument at its first ``=`` instead.
"""

from __future__ import annotations

from stackwise_bench.errors import ConfigError


def parse_key_values(argv: list[str], defaults: dict, usage: str) -> dict:
    """The arguments as a nested dict, every key checked against ``defaults`` (one level of ``a.b`` nesting).

    Raises:
        ConfigError: an argument without ``=``, a key ``defaults`` lacks, or a value OmegaConf cannot parse.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not key=value; {usage}")
        key = arg.split("=", 1)[0]
        top, _, sub = key.partition(".")
        if top not in defaults or (sub and sub not in (defaults[top] if isinstance(defaults[top], dict) else {})):
            raise ConfigError(f"unknown key {key!r}; the keys are {', '.join(_keys(defaults))}.")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(argv)))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"could not parse the arguments ({exc}); {usage}") from exc


def _keys(tree: dict, prefix: str = "") -> list[str]:
    return [
        k for key, v in tree.items() for k in (_keys(v, f"{prefix}{key}.") if isinstance(v, dict) else [prefix + key])
    ]
