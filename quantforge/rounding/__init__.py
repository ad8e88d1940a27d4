"""Optimized rounding inside the standard GGUF types: the same block layouts and scale searches as llama.cpp,
with the codes (and super-scales) chosen to lower the layer's output error rather than each weight's own.

Modes: ``rtn`` (the type's default rounding, byte-exact with llama.cpp) and ``gptq`` (:mod:`.gptq`, error
feedback through the inverse of the inputs' second-moment matrix saved by calibration, :mod:`.hessians`).
"""

import functools

MODES = ("rtn", "gptq")


def build_rounders(types: dict[str, str], default: str = "rtn", per_tensor: dict[str, str] | None = None,
                   hessians: object = None) -> dict[str, object]:
    """``{weight name: quantize(rows, imatrix) callable}`` for the weights whose mode is not ``rtn``.

    ``types`` maps GGUF weight names to format names, ``default`` is the mode of every weight ``per_tensor`` (a
    plan's choices) does not name, ``hessians`` the calibration's ``hessians.safetensors``. A weight keeps the
    default rounding where the mode cannot apply: no recorded input (token embedding, output head, norms,
    stacked experts) or a type whose codes are lattice indices or floats.
    """
    from ..errors import InputError

    per_tensor = per_tensor or {}
    modes = {name: per_tensor.get(name, default) for name in types}
    for mode in set(modes.values()):
        if mode not in MODES:
            raise InputError(f"unknown rounding mode {mode!r}; expected one of {', '.join(MODES)}")
    wanted = [name for name, mode in modes.items() if mode == "gptq"]
    if not wanted:
        return {}
    if hessians is None:
        raise InputError("--optimize gptq needs --calibration DIR with hessians.safetensors "
                         "('quantforge calibrate MODEL --data F -o DIR --hessians')")
    from ..formats import get_format
    from .gptq import FactorCache, GptqRounder
    from .grids import SUPPORTED
    from .hessians import Hessians

    store = Hessians(hessians)
    cache = FactorCache()
    out: dict[str, object] = {}
    for name in wanted:
        group = store.group_of(name)
        if types[name] not in SUPPORTED or group is None:
            continue
        out[name] = GptqRounder(get_format(types[name]), functools.partial(store.for_tensor, name), group, cache)
    return out
