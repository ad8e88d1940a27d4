"""The lattices of the 1- to 3-bit i-quants and the search tables ggml builds from them.

Each i-quant stores groups of 8 (IQ1/IQ2) or 4 (IQ3) weights as an index into a fixed set of lattice points.
A point is a tuple of small integer *levels* (0..2 for IQ1/IQ2, 0..7 for IQ3), identified by its *key*: the
levels packed little-endian, 2 bits each (IQ1/IQ2) or 3 bits each (IQ3). The point sets are llama.cpp's
constant tables (``kgrid_*`` in ``iq2xs_init_impl`` / ``iq3xs_init_impl``); they are kept here as their
ascending keys, stored as LEB128 varints of ``key[i] - key[i-1] - 1`` in base85 (:data:`_KEYS`).

What ggml derives from them at ``ggml_quantize_init`` is derived here the same way (:func:`search_tables`):

* the quantizer's point coordinates ``2 * level + 1``;
* ``map[key]``: the index of the point with that key, or -1;
* for every key that is not a point, its *neighbours*: all points whose squared distance (in those coordinates)
  is among the ``nwant`` smallest distinct distances, ordered by (distance, index). ggml computes them for every
  key; the quantizers only ever look up keys whose levels stay below the search's clamp, so only those are built.

The dequantizers use the levels through per-type value maps (:data:`DEQUANT_LEVELS`; e.g. IQ2 levels 0, 1, 2
decode to 8, 25, 43 as in ggml-common.h's ``iq2xxs_grid``).
"""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass

import torch

_KEYS = {
    "iq2_256": (
        "009C50R{pK0R;gT0t*KS0viDb7hVDj1S&%lX8|8y{sICE5CR(k1s5O!3lm!b1s5eE77%v^FGC;O0t5mJ6Bq&u0X2I&!2uEM3jzxe9v>q"
        "M1ZoEtF9{{10U){q2Nwh*HkScOodFf<0|E;#Kz;<80k8qC3jqf?93BCt0Uoyj0saF53ojL^0YD<F0`~$JbFTxuD*_7#2m%`i4GACu3vV"
        "Al9t3+1Hw_V&0|ysh7<due0e}Po3oit^0apkh!U0O}3I_-W244qzJz?wt{sRGb_5o6>0}uyF+X2S``wI&%Czk<K!U0F00|bf!0dc(ry)"
        "OX=Hb8*^6DQCC?*jr01S%h&0Yy!8HXoq_fdY&I@(T+S8(?&4!~wbkAt8(cuLhn0;SEhRg8}vdmjt&6vjG"
    ),
    "iq2_512": (
        "009C50R{pA0tNvB0vG}T0tNvB0tf;d0RjRD0t5zN0s#UB0RjR61_B!a0s;sE3kMhi3vU4e0tf;NAOZ^nDhc)i0s#UB0RjRD0viDW0tf;"
        "D2_OOsZvg@V2m%Wr0t*lxfB^yv6&V3R`vL(10s#gB3j`Yi3kN433049NFF*%&9|vs-;0gi(0tNvB0tf;d0RjRD0t*Qi0t;^e0s;sE3m^"
        "guFB1W30s#pxAD;sO0s;sE3m^gn1``{A0RjszzX208w*vwT0WA|Tc?4kU0aw-v0RjR61_BEp0t+u6U;+y-2OOFKAzdff0s;#d7QX>N5J"
        "qPhivigJ2LTl{G8x4ICwCWN1p)Rd0s#UB0RjRD0viDW0s#gB3j`Yi3vU4e0tf;NAOZ_71RP!h3jr1uzXJgR0tf;G1|R|pFB5D63lkezW"
        "eGV8umb`MF9Z$^odFOs3mBRK`wIaA0tf;N2N(hiFMt683j`_wy#YgI)&c?x5FQ^OA6^G{2bcjyINkyiEDlJ30VM&#0{aRA3ojE5BO+F#"
        "0wqW70u}iIF9crP1ZcVe-~mkyohtzX0tf;N2^IniF99V1RssPDFAxW&0Uuuh9S7I~0t*2GDjz6zLtt`Il>-MHG$jEgU7G@32MrO}3IYo"
        "+6)k%qLGb}H_5uVx3kT2vW&y4Nj|5br0m}hOp9=v60Tl^#umJ~5SpfwhRUe-NRL=u4@d6bA1$PHqe*vKZ0cIE"
    ),
    "iq2_1024": (
        "009C50R{pA0tNvB0vG}T0tNvB0tf;D0u})R0tf;N1O!$B0RjdA0s;sE8vz0W2m%2D1_S~a0t*2G3j$jK0s;sE3keni0RjdDDg*=x4c-C"
        "*0RjdA0s;sE0Rk2Q0s;XB0s#UB0RkHW0RjdD0tf<I0RjR61_A*B1_S~a0s#UB0RjRD0viDW0tf;NU;+UG1_UYu0tf;NAOZ{T0s#U72m%"
        "2D1_T5a0s#UB0RjRD0viMl6;=WZ0RjRD9s~ji0t+AxZx8|v1py^U=L!M=0tNvB0tf;D836(U2m%2D1_1&B7y<za1Of;GTLA(B0R{pA0t"
        "NvB0vG}T0tNvB0tf;d0RjRD0&D^V1_TQN8w3jiECLJf0s#U72m%2D1_S~a0s#UB0RjRD0viDW0tf;NU;+UG1_1&B2m%`c0s;sE3m^guZ"
        "v+Ae0t+Al3oj|w0s;X71_S~K9svRZ2m%Wr0($`h0tf;NAOZ^*IAIGf6{!mW0s;sE0RjdD1Qr4d0Rj#i2?-Te0t*2G3myRi3jzxu0t;^m"
        "7X<+s3pW8B*a89p0tN&E2m%`c0s;sE3m^guZv+Ae0t+Al3l$lF0Rjsz7^VXR3j!<x3ppQF0t<uzbQeJ*0rn~a0RjdA0s;XB0s$ET0s;X"
        "B0s#UB0RkHW3j_iP0$TwB0tf;D0tNvB8v+3W1_1&B2m%`c0s;sE3t$2Z0RjRG8w3If0t+Al`vL(10s#gB0RjdA0s<HU0RjdA0s;sE8vz"
        "0W2m%XW0s#UB0RjRD0viDW0tf;N2^IniZvg@V2m%Wr0t+uB+X4av1_1&B2m%`c0s;sE3nL3}0RjRD0t+Al3ojLF0t+v{3jqQG2m%2D1_"
        "1&B7y<zT1_1&B2m%`c0s;sEYytrS1_1&B2m%`c0s;sE3m^guZv+Ae0t+Al3m6uF0|Eg81_1&B2m%`c0s;sE3m^guZvg@V2m%Wr0t+vI0"
        "RjsZ8NUMo0s;sE3m^gu2_=950t+v{0T^o{*a`vx2>}8E2m%`f0tf;NBMWZ<0s;sE3m^guFBobIFBMAO0t5mG0t+Al3on2H0t+t*9Vu;-"
        "0qg<-3sf>^DVG9X-YNkC0tf;G1_T=d3jqQG2p$9r0&D^V1_1&B2m%`c0s;sEECLG{Rs;kF0xSXxumb`C0tNvB0tg-f0s;sE3m^guZvg@"
        "V2m%Wr0t+t*b^;3+7QX`o3j!<x3sGJIJ0!dTH326d-U<Q)1_1&B3mX9f0tf;NAOZ_-1PcNz0t*SI0RjszW!VA&0s;sE3m^guFBNJ63ol"
        "m)UPT?80|E;b8E95W2)zRD3IqfR4F?ti3sDD^0VJFO2NwkaR|Nqb*a89zFGw0&7`Fnr108v>0WpCA0TlrSUm*"
    ),
    "iq1_2048": (
        "009C50R{sK0R;gX3jzTS8UY0X3JL)Q0a*YG0s#U53L69h2m%BK0s#RW3jzTSS^)(C3JL)Q0U8Sj3IrAb1px*F0|o&F0p<b%0S+4n3j_%"
        "OD+dc(0ssIG0s#&d1Ox>D0ssI41_1&B0TvGf0s#gB0007N1SbLu0RjRC00aUX3jze@0s#d93JL)Q0U8Sg4jKUk0SXEM1p!(M0t5;G8x8"
        ";i3jzcu0s#UGS^)(C3JL)Q0U8Sj2Ll=b0s;XF3IPQH<q7}-1PTBf0t*BJ2m$~DCjtQq16u+C0tNvB0tf;G8w3Ra009610tN&g4FU@SYy"
        "tre8U+Ff0s;XE0Uiqi0S?;&1Of^G0ssdD8Up|U0R{p900IaC0viMd0{{X500sg816TqC1_A&80tNvB0s$5R000UA0RR9300sg800I^P0"
        "RRF41pop700IC70RmeB000gE0RaXC836$R0s#gC009680ssO402>1b0uBV{0t5~l0s#UB1OfpC00IF58w&yuY5@WS1_K-c00IaC00062"
        "1q1{h2LJ*B2m}IO3=IJt0RjdA0s;sG0vihi1LX<<1px{Q0RjR68Vd&p0~!GZ0SXEM0s;YA3jzcS903Fi0s#gB0015e1p*6O1_1^G3IPQ"
        "H8Vdvh3mXOj1_KHK1p(Ru4gmrS9smFW2m%5D3myvs1P23S3kwGp1Of;G00RgD0w4wh00IF90s#VB3IPTS8wU#t00$ZY2?^x_0R;gH3IP"
        "QH8Vdpt8UY0X6#)eSUIzjM3m^gr0t*5G0viei0tx_H0R;gS0R;gX3j_iS8UY0X3JL)Q0op1H1P&tz0s;XB0s$=q2LxFF0s#UD0ssL41_"
        "S~d0s#gB000623IYKZ0s#pD0tx^CVhaKR4jT{x1PKHm3J}`@69W$$0s#gB000UA0s;XR1Of&D0tx^JR{#P81_A&80tN&G76JeO0tNsA0"
        "00312Lb>90vG`R0tf;C00ICC0s&S70}22F0R{pD76AeR2LJ#900IaC0vH1X2>=TM0p0=&0|W{j1_lHI2m%2D8w&yf0t;IM00RXB00IaC"
        "0T~1Y1^@v700IU90ssRW0tf;C0SE#C0&Fb-0t*5G2?Qz-+X?~z00IaC1O@^G76bwa0ssI43j!Si3jzlK1Oi(E000I8000311_S^B0Tu!"
        "P00IU8009610RR970ssI47y=6d000681O!$D3jzcN0v!Sb1_A&80tf;h3IPHG014j$01E;D009680|EgS0ssI400jU70003100sa7000"
        "6O2LT2G000690ssV7009610tNs80RR9300sg800I^O009610RRR7009610RR9600IC20RR9N0ssR51pop7009680ssI4RsaA20RaF90s"
        "sO41^@s7000317XttR000F5009610RR970ssRT0ssL300sjD2Lb>A0NMfo00IUC0tg5i0s#gB000311_1#890mpf0s;sJR{#P81_A&80"
        "t*`g0006800031009611_A&80v7`V2Lb>90RRhL0}KQO1ONgX0ssdC009690s;XR2nPZH0RaZ%3Jw7R3myvu009980s#US6b@Sg0RjjD"
        "3jhNG8v_Re00IjD0~rMe0t*BJX9NN!00a&I0S6=t1P<#000IC51_S~Y0RjR61_A&80ssX80v-SZ1_1#8009980t8zE0R{sA0xAFi0tNs"
        "A000690ssI490C9a0{{X52Lb>ASq2LV1pxpS1OfpD0ssI30R;pC7XbnU2>}5B1_J>D>jDA`8xR5n1_v7p1`S#Q3j_-S0Rk2P0{{UC0ss"
        "I41_T5b0R;*R0ssSN1OX@l1O@~G0SN#D91Q~j3)w0G1pyTS1pyig00IF53mO3h0SXEM1p!(M0s#UG8v+Cd0RjL4015#D8v_af0t;FJ1p"
        "x{Q0R;gj0t5>h0R;gH3IPQH=>h~N0t^EL1_A^s1ZM{b0t5>J761bR2m$~A0ssmC0Ra{Q0RjdA0s;+c1Of{i0t5gB1OosD1Opli2npK)0"
        "R;gH3IPQH76S_c1PcQe0R;gH3IPQHS^x?H0S+4i0RjdA0t5yEAP@ozS^)(C3JL)Q0U8Se0Vx3m0SXEM1p(R$3j_fG3mXIi3jzTS02&Jd"
        "0RjtK0s#UB1OfpD0s#UR1PTBG0006A0v-Vi0s;sE0RmeK0t5>l0RjdA0s;*J8x8>y*8&0o2?PQS83_gg000311^@s89svsh00IaHRs;e"
        "81pop700IXC0{|8R0006800031009611_A&80v7`U2mk>900IC70RjR6RsstI0|o^G8v+0a00IC43j!Gd1ONvC01g2H+X4^*3mXIp0Rj"
        "L62>>4p1Of|Q0RjdA0s;XA00IFS0RjR61_A&80tf;C0~P`c0RjXD1YQph9svRd1Of;n3jzQD=?Vb_0SXEM1pyih0s#Uh0R;gH3IPQHS_"
        "20H0RjLk0tW*E0R{pf3IPKGXaxZU2nYoM8Vdvh3mO3h0SXEM1p)2?3mXCp0{{X61_J;A02_b-0tNvB0u2Hf0t*5F00IjH76JeO0tf;EY"
        "zqVf1_K@e0|x>C0S5si2?PKF2Lb`v0s#d96#)eSCISHhCIJNj3JL)Q0a^|O2Ll@p1Ox^I0wx7%0R;gS0R;gj0s$!j1px{Q0R;g"
    ),
    "iq3_256": (
        "009960RsR51_&4d0|5j91_J^C1_}!Y0RaRC0R{mB2?Y%U1pomGA`%k>3JU=P1riT3783&j6b%mn1OWyC1OWjG02cuU1_3Ss1OWyHAq4>"
        "q2n-Jj10p8_5fTeb4Icpp0R#a90tg-f0RjOA1{wnZ2LT2J009gD3=;+eD+3@67ZV8@L;(sG8wLRe0Tc`b1py5R3IQ4c1Pl}p4iP*K5(N"
        "bd8Xgf8ClnJ34FL-SOcM?O4+Rh%9wZ7N4HQfQ0Sz%076%0n79I^B2Phm010n|&PAd&D4*?Av9~~qk1w|kvFeeQ$0RaFJ4=V{N8Uz&#4H"
        "O^`9sv<U"
    ),
    "iq3_512": (
        "000020RR910RaI30|f*D0s#R51OWyD0ssI20RsR70s;d80|pEO1O)&C0RRF50s{gA1p)y90Sp2M1p@*B1_1&E0|5*H0|E*I0RjaD0tF5"
        "U0Sf^G1O)>D4g?AU0Syoi1_1#J0RsdK0}}uM0RsR50RaF31_A*M0RjjG009C40|W*F1qJ~P1px^H0RRI91p)~I2?hcJ00IRC00RUN1qu"
        "NK0So~K0|5gR1_A{J0S+bu0t^8f0R#aC3j+`Z2LJ&90RRC30RjO7009O80RjOG00IF50R;jB0s;d91qK%a0to>G1_22J2?7HF0s{yE1O"
        "WyG4GIMa0tNyD7y<?a2n+xU3<m)O2^#|w0}KHQ1Q`Ya0RaLA0RaR70s#pH2LS;F1OW^W2?GHM1qlHQ7zP6b0RsRC0RsgM2L%KJ1`q`U3"
        "<d!T1PKWY5)vN)3;_xv0|f;G0s;mG4+#VT0R{yG1qA~W0R#jC2?P!T1q%cL1OWyEA^{N!02m7a2_P5{6Bh&u3I!Mi0|gBO0s;#K1OWjA"
        "1_&Po2nhrQ3>E|c4h#ef1qA{N2@4|&5&<?J0Sz_*0Sf^X4-W<$6%hpr1O*2R1P(L}4h;er6BHUK0W<>w2muQL3k44b3Jw7q0s{pC1`rq"
        "*0u2=d1q2r<4<8mL"
    ),
}

#: Lattice name -> (number of levels a coordinate can take, levels per point (dimension), bits per level in a key).
LATTICES = {
    "iq2_256": (3, 8, 2), "iq2_512": (3, 8, 2), "iq2_1024": (3, 8, 2), "iq1_2048": (3, 8, 2),
    "iq3_256": (8, 4, 3), "iq3_512": (8, 4, 3),
}

#: Dequantized value of each level, by lattice (ggml-common.h's ``iq2xxs_grid`` ... ``iq1s_grid`` byte values).
DEQUANT_LEVELS = {
    "iq2_256": (8, 25, 43), "iq2_512": (8, 25, 43), "iq2_1024": (8, 25, 43), "iq1_2048": (-1, 0, 1),
    "iq3_256": (4, 12, 20, 28, 36, 44, 52, 62), "iq3_512": (1, 3, 5, 7, 9, 11, 13, 15),
}


def _decode(text: str) -> list[int]:
    raw = base64.b85decode(text)
    keys, key, shift, acc = [], -1, 0, 0
    for b in raw:
        acc |= (b & 127) << shift
        shift += 7
        if b < 128:
            key += acc + 1
            keys.append(key)
            acc, shift = 0, 0
    return keys


@functools.lru_cache(maxsize=None)
def keys(name: str) -> torch.Tensor:
    """The ascending keys of lattice ``name`` as int64 ``(n_points,)``."""
    return torch.tensor(_decode(_KEYS[name]), dtype=torch.int64)


def _levels_of(k: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    shifts = bits * torch.arange(dim, dtype=torch.int64)
    return (k[:, None] >> shifts) & ((1 << bits) - 1)


@functools.lru_cache(maxsize=None)
def levels(name: str) -> torch.Tensor:
    """Levels of every point of lattice ``name``: int64 ``(n_points, dim)``."""
    _, dim, bits = LATTICES[name]
    return _levels_of(keys(name), dim, bits)


@functools.lru_cache(maxsize=None)
def dequant_grid(name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Decoded values of every point: float32 ``(n_points, dim)`` (ggml's dequantization grid)."""
    values = torch.tensor(DEQUANT_LEVELS[name], dtype=torch.float32)
    return values[levels(name)].to(device)


@dataclass(frozen=True)
class SearchTables:
    """What a quantizer searches with (all on one device).

    ``coords``: float32 ``(n_points, dim)``, ``2 * level + 1``. ``map``: int64 ``(n_keys,)`` point index per key
    or -1. ``neighbours``: int64 ``(n_off, K)`` point indices (padded with -1), one row per reachable key off the
    lattice; ``row``: int64 ``(n_keys,)`` that key's row (-1 for the others). ``dim``, ``bits``: point dimension
    and bits per level in a key.
    """

    coords: torch.Tensor
    map: torch.Tensor
    neighbours: torch.Tensor
    row: torch.Tensor
    dim: int
    bits: int


@functools.lru_cache(maxsize=None)
def _cpu_tables(name: str, nwant: int, max_level: int) -> SearchTables:
    _, dim, bits = LATTICES[name]
    pts = levels(name)
    n_keys = 1 << (bits * dim)
    key_map = torch.full((n_keys,), -1, dtype=torch.int64)
    key_map[keys(name)] = torch.arange(pts.shape[0])
    # Keys reachable by the searches: every level in 0..max_level.
    grid = torch.cartesian_prod(*[torch.arange(max_level + 1)] * dim).flip(1)
    weights = 1 << (bits * torch.arange(dim, dtype=torch.int64))
    reach = (grid * weights).sum(dim=1)
    off = reach[key_map[reach] < 0]
    pos = (2 * _levels_of(off, dim, bits) + 1).to(torch.float32)
    coords = (2 * pts + 1).to(torch.float32)
    # Squared distances as |p|^2 + |c|^2 - 2 p.c: small integers, exact in float32 (as are the sort keys below).
    d2 = (pos * pos).sum(1, keepdim=True) + (coords * coords).sum(1) - 2.0 * (pos @ coords.t())
    n_pts = pts.shape[0]
    sort_key = d2 * n_pts + torch.arange(n_pts, dtype=torch.float32)
    k = min(n_pts, 512)  # the neighbour lists are shorter; checked below, else the full sort
    while True:
        order = torch.topk(sort_key, k, dim=1, largest=False, sorted=True).indices
        sd2 = d2.gather(1, order)
        rank = torch.cat([torch.zeros_like(sd2[:, :1]), (sd2[:, 1:] != sd2[:, :-1]).to(torch.int64)], 1).cumsum(1)
        if k == n_pts or bool((rank[:, -1] >= nwant).all()):
            break
        k = n_pts
    keep = rank < nwant
    width = int(keep.sum(dim=1).max())
    row = torch.full((n_keys,), -1, dtype=torch.int64)
    row[off] = torch.arange(off.shape[0])
    nb = torch.where(keep, order, -1)[:, :width].contiguous()
    return SearchTables(coords, key_map, nb, row, dim, bits)


@functools.lru_cache(maxsize=None)
def search_tables(name: str, nwant: int, max_level: int, device: torch.device | str = "cpu") -> SearchTables:
    """The quantizer tables of lattice ``name`` with ``nwant`` neighbour distances (ggml: 2 for IQ2_XXS/IQ2_XS and
    IQ3_XXS, 3 for IQ1 and IQ3_S, 1 for IQ2_S), for searches whose levels stay within ``0..max_level``."""
    t = _cpu_tables(name, nwant, max_level)
    return SearchTables(t.coords.to(device), t.map.to(device), t.neighbours.to(device), t.row.to(device), t.dim, t.bits)


def ksigns(device: torch.device | str = "cpu") -> torch.Tensor:
    """ggml's ``ksigns_iq2xs``: 7 stored sign bits -> 8 sign bits, the 8th making the count of minus signs even."""
    i = torch.arange(128, dtype=torch.int64)
    parity = torch.zeros_like(i)
    for b in range(7):
        parity ^= (i >> b) & 1
    return (i | (parity << 7)).to(device)
