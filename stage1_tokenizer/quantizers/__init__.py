"""The quantizer library: one file per variant, one registry, one interface (see ``base.Quantizer``).

    q = build_quantizer("diveq", num_codes=512, dim=64)
    out = q(z)  # z: (B, 64, H, W) -> out.quantized, out.indices, out.loss, out.stats
"""
from __future__ import annotations

import inspect

from torch import nn

from .base import MAINTENANCE_OPTIONS, Quantizer, QuantizerOutput
from .bsq import BSQ
from .diveq import DiVeQ, DiVeQDetach
from .ema import EMA
from .fc import FactorizedVQ
from .fsq import FSQ
from .gumbel import GumbelVQ
from .ibq import IBQ
from .lfq import LFQ
from .maintenance import POLICIES
from .ns_vq import NSVQ
from .nsvq_noise import NoiseSubstitutionVQ
from .rotation import RotationVQ
from .rvq import ResidualVQ
from .search import nearest_code
from .sf_diveq import SFDiVeQ, SFDiVeQDetach
from .simvq import SimVQ
from .transvq import TransVQ
from .vq import VQ

QUANTIZERS: dict[str, type[nn.Module]] = {
    "vq": VQ,
    "ema": EMA,
    "fc": FactorizedVQ,
    "simvq": SimVQ,
    "transvq": TransVQ,
    "ns-vq": NSVQ,
    "nsvq-noise": NoiseSubstitutionVQ,
    "diveq": DiVeQ,
    "diveq-detach": DiVeQDetach,
    "sf-diveq": SFDiVeQ,
    "sf-diveq-detach": SFDiVeQDetach,
    "rotation": RotationVQ,
    "gumbel": GumbelVQ,
    "rvq": ResidualVQ,
    "fsq": FSQ,
    "lfq": LFQ,
    "bsq": BSQ,
    "ibq": IBQ,
}


def valid_options(cls: type) -> list[str]:
    """Keyword options a variant accepts: its own and those of every base class up to ``Quantizer``."""
    names: list[str] = []
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or "__init__" not in vars(klass):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.kind is p.KEYWORD_ONLY and p.name not in names:
                names.append(p.name)
    hidden = set(getattr(cls, "unused_options", ())) | (set() if getattr(cls, "maintained", True) else set(MAINTENANCE_OPTIONS))
    return [n for n in names if n not in hidden]


RENAMED_OPTIONS = {  # renamed when the defaults moved to the released code (docs/fidelity.md): old -> new
    "sigma2": "noise_std, the noise's standard deviation (default 1e-3, as the authors' code); the old sigma2=v "
              "was read as a variance, so it is noise_std=sqrt(v)",
    "hard_inference": "inference='hard' (SF-DiVeQ's inference is 'local' by default; 'global' and 'hard' are options)",
}


def build_quantizer(name: str, num_codes: int, dim: int, **options) -> nn.Module:
    """Build the variant ``name``; unknown names or options raise a ValueError listing what is valid.

    ``rvq`` takes ``base=<name>`` (default ``vq``) and ``num_quantizers`` (default 2); its other
    options go to every stage.
    """
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; valid: {', '.join(QUANTIZERS)}")
    if name == "rvq":
        base = options.pop("base", "vq")
        depth = options.pop("num_quantizers", 2)
        if base == "rvq" or base not in QUANTIZERS:
            raise ValueError(f"rvq base must be one of: {', '.join(n for n in QUANTIZERS if n != 'rvq')}; got {base!r}")
        if int(depth) < 1:
            raise ValueError(f"rvq needs num_quantizers >= 1, got {depth}")
        return ResidualVQ([build_quantizer(base, num_codes, dim, **options) for _ in range(int(depth))])
    cls = QUANTIZERS[name]
    renamed = sorted(set(options) & set(RENAMED_OPTIONS))
    if renamed:
        raise ValueError("; ".join(f"quantizer option {old!r} was replaced by {RENAMED_OPTIONS[old]}" for old in renamed))
    allowed = valid_options(cls)
    unknown = sorted(set(options) - set(allowed) - set(MAINTENANCE_OPTIONS))  # a fixed table says why it refuses these
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for quantizer {name!r}; valid: {', '.join(allowed)}")
    if options.get("replacement") not in (None, *POLICIES):
        raise ValueError(f"unknown replacement {options['replacement']!r}; valid: {', '.join(POLICIES)}")
    return cls(num_codes, dim, **options)


__all__ = ["QUANTIZERS", "Quantizer", "QuantizerOutput", "ResidualVQ", "build_quantizer", "nearest_code", "valid_options"]
