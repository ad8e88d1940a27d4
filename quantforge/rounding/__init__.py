"""Optimized rounding inside the standard GGUF types: the same block layouts and scale searches as llama.cpp,
with the codes (and super-scales) chosen to lower the layer's output error rather than each weight's own.

Modes: ``rtn`` (the type's default rounding, byte-exact with llama.cpp) and ``gptq`` (:mod:`.gptq`, error
feedback through the inverse of the inputs' second-moment matrix saved by calibration, :mod:`.hessians`), and
``tune`` (:mod:`.tune`, ``gptq``'s codes and block scales refined further against the same output error).
``gptq`` covers the k-quants, the legacy types, ``q8_0``, ``iq4_nl`` / ``iq4_xs`` (feedback per column) and the
lattice i-quants ``iq1_s`` ... ``iq3_s`` (:mod:`.lattice`, feedback per 256-weight super-block); ``tune`` covers
the types with consecutive integer codes and gives ``gptq``'s rounding to the others.
"""

import functools

MODES = ("rtn", "gptq", "tune")


def build_rounders(types: dict[str, str], default: str = "rtn", per_tensor: dict[str, str] | None = None,
                   hessians: object = None, cache: object = None) -> dict[str, object]:
    """``{weight name: quantize(rows, imatrix) callable}`` for the weights whose mode is not ``rtn``.

    ``types`` maps GGUF weight names to format names, ``default`` is the mode of every weight ``per_tensor`` (a
    plan's choices) does not name, ``hessians`` the calibration's ``hessians.safetensors`` (``cache``: a
    :class:`.gptq.FactorCache` to share factors with other calls). A weight keeps the
    default rounding where the mode cannot apply: no recorded input (token embedding, output head, norms,
    stacked experts) or a type without codes to choose (floats, the ternary ``tq`` types); ``tune`` gives
    ``gptq``'s rounding to the types it does not cover (``iq4_nl``, ``iq4_xs`` and the lattice i-quants). A
    sequential file (``sequential.safetensors``) adds each group's correction (:class:`CompensatedRounder`); it
    must have been made for the same type of every weight it covers.
    """
    from ..errors import InputError

    per_tensor = per_tensor or {}
    modes = {name: per_tensor.get(name, default) for name in types}
    for mode in set(modes.values()):
        if mode not in MODES:
            raise InputError(f"unknown rounding mode {mode!r}; expected one of {', '.join(MODES)}")
    wanted = [name for name, mode in modes.items() if mode in ("gptq", "tune")]
    if not wanted:
        return {}
    if hessians is None:
        raise InputError(f"--optimize {modes[wanted[0]]} needs --calibration DIR with hessians.safetensors "
                         "('quantforge calibrate MODEL --data F -o DIR --hessians')")
    from .gptq import FactorCache
    from .hessians import Hessians
    from .tune import SecondMoments

    store = Hessians(hessians)
    if store.types:
        differ = [n for n in wanted if n in store.types and store.types[n] != types[n]]
        if differ:
            raise InputError(f"{store.path.name} was made for other tensor types ({differ[0]}: "
                             f"{store.types[differ[0]]}, here {types[differ[0]]}; {len(differ)} tensors differ); "
                             "run 'quantforge calibrate --sequential' again with this type or plan")
    cache = cache or FactorCache()
    moments = SecondMoments()
    out: dict[str, object] = {}
    for name in wanted:
        group = store.group_of(name)
        if not optimizable(types[name]) or group is None:
            continue
        out[name] = make_rounder(types[name], modes[name], functools.partial(store.for_tensor, name), group, cache,
                                 moments, store.tokens.get(group))
        if store.has_correction(name):
            out[name] = CompensatedRounder(out[name], functools.partial(store.correction_for, name), group, moments)
    return out


def optimizable(fmt: str) -> bool:
    """Whether type ``fmt`` has codes the optimized modes can choose (the k-quants, legacy types, ``q8_0``, the
    i-quants); floats and the ternary types keep their default rounding."""
    from .grids import SUPPORTED
    from .lattice import covers

    return fmt in SUPPORTED or covers(fmt)


def make_rounder(fmt: str, mode: str, load: object, group: str, cache: object = None, moments: object = None,
                 tokens: int | None = None) -> object:
    """The ``quantize(rows, imatrix)`` callable of mode ``gptq`` or ``tune`` for type ``fmt``, with the inputs'
    ``H`` from ``load()`` (shared under ``group`` through ``cache`` / ``moments``); ``tune`` gives ``gptq``'s
    rounding to the types it does not cover."""
    from ..formats import get_format
    from .gptq import FactorCache, GptqRounder
    from .tune import SecondMoments, TuneRounder, covers

    rounder: object = GptqRounder(get_format(fmt), load, group, cache or FactorCache())
    if mode == "tune" and covers(fmt):
        rounder = TuneRounder(get_format(fmt), load, group, rounder, moments or SecondMoments(), tokens=tokens)
    return rounder


class CompensatedRounder:
    """Rounds ``W + W D`` instead of ``W``: the target that makes the output on the quantized model's inputs match
    the float model's (``D`` of the weight's input group from a sequential calibration, loaded by ``load`` and
    shared through ``moments`` under ``group``); ``inner`` is the mode's rounder, fitted to those inputs' ``H``."""

    def __init__(self, inner: object, load: object, group: str, moments: object) -> None:
        self.inner, self.load, self.key, self.moments = inner, load, "correction:" + group, moments

    def __call__(self, weight: object, imatrix: object = None) -> object:
        import torch

        d = self.moments.get(self.key, self.load, weight.device)
        w = weight.to(torch.float32)
        return self.inner(torch.addmm(w, w, d), imatrix)


class ModeRounders:
    """Round trips of single weights under a rounding mode, for measuring what a tensor loses in the format and
    rounding it will be written with (calibration's sensitivity stage): the same rounders the exporter builds
    (:func:`build_rounders`), with the factors of the last few input groups kept between calls."""

    def __init__(self, mode: str, hessians: object) -> None:
        from .gptq import FactorCache

        if mode not in MODES:
            from ..errors import InputError

            raise InputError(f"unknown rounding mode {mode!r}; expected one of {', '.join(MODES)}")
        self.mode, self.hessians = mode, hessians
        self.cache = FactorCache()
        self._h: tuple[str, object] | None = None

    def second_moments(self, name: str, device: object = None) -> object:
        """``H`` (float32 ``(n, n)`` on ``device``) of GGUF tensor ``name``'s inputs, or ``None`` without one; the
        last group read is kept."""
        from .hessians import Hessians

        store = Hessians(self.hessians)
        group = store.group_of(name)
        if group is None:
            return None
        if self._h is None or self._h[0] != group:
            self._h = (group, store.for_tensor(name))
        return self._h[1].to(device) if device is not None else self._h[1]

    def round_trip(self, name: str, weight: object, fmt: str, imatrix: object = None) -> object:
        """``weight`` rows ``(R, n)`` of GGUF tensor ``name`` encoded as ``fmt`` under the mode and decoded
        (float32), or ``None`` where the mode keeps the type's default rounding."""
        import torch

        from ..formats import get_format

        if weight.dim() != 2:
            return None
        rounder = build_rounders({name: fmt}, self.mode, hessians=self.hessians, cache=self.cache).get(name)
        if rounder is None:
            return None
        w = weight.to(torch.float32)
        im = None if imatrix is None else torch.as_tensor(imatrix, dtype=torch.float32, device=w.device)
        return get_format(fmt).dequantize(rounder(w, im)).reshape(w.shape)
