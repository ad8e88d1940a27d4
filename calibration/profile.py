"""Stage 2 of calibration (sensitivity), on held-out chunks:

1. a forward pass caches the input of every layer and the base log-probabilities;
2. a backward pass, layer by layer from the top, with labels sampled from the model, gives the diagonal
   Fisher of each weight; the weight errors of every candidate format (with the imatrix, as the exporter
   quantizes) then give both proxies of :mod:`.sensitivity`;
3. the selected (tensor, format) pairs are measured: the tensor alone is quantized and the model is re-run from
   its layer's cached input, and the mean KL divergence against the base is recorded;
4. the proxies are fitted to the measurements and every pair gets a predicted KLD.
"""

from __future__ import annotations

from typing import Any

from ..imatrix import Imatrix
from . import candidates as cand
from . import sensitivity as sens
from .hooks import swapped_weight, weight_grads
from .refs import Contexts, TensorRef
from .runner import DecoderRunner
from .settings import CalibrationSettings, Progress, no_progress

SENSITIVITY_VERSION = 1


class Profiler:
    """Stage 2 state: cached layer inputs and base log-probs of the held-out chunks, Fisher, proxies, KLDs."""

    def __init__(self, runner: DecoderRunner, refs: list[TensorRef], imatrix: Imatrix, holdout: list[list[int]],
                 settings: CalibrationSettings, progress: Progress = no_progress) -> None:
        self.runner = runner
        self.refs = refs
        self.imatrix = imatrix
        self.ids = holdout
        self.s = settings
        self.progress = progress
        self.ctxs = Contexts(runner)
        self.n_tokens = sum(len(c) for c in holdout)
        self.records: dict[str, dict[str, dict[str, Any]]] = {r.gguf_name: {} for r in refs}
        self.base_nll = float("nan")
        self.rounders: Any = None  # quantforge.rounding.ModeRounders of the settings' optimized rounding, if any

    def round_trip(self, ref: TensorRef, weight: Any, fmt: str, imatrix: Any) -> Any:
        """Rows of ``ref``'s weight encoded as ``fmt`` and decoded, rounded as the exporter will round them: the
        settings' optimized mode where it applies to this tensor and format, else the format's own rounding."""
        if self.rounders is not None:
            out = self.rounders.round_trip(ref.gguf_name, weight, fmt, imatrix)
            if out is not None:
                return out
        return cand.fake_quantize(weight, fmt, imatrix)

    @property
    def accumulate_on(self) -> Any:
        """Where the Fisher sums live: the model's device when the model stays there (no host round trip per
        backward), else the host (one layer's worth at a time)."""
        import torch

        return self.runner.device if self.runner.resident else torch.device("cpu")

    def _imat(self, ref: TensorRef) -> Any:
        """The imatrix the codecs get for ``ref``. A stacked expert tensor has one slice per expert; its
        sensitivity is estimated with the token-weighted mean over experts (the exported GGUF uses each
        expert's own slice, as llama.cpp does)."""
        import torch

        e = self.imatrix.entries.get(ref.gguf_name)
        if e is None:
            return None
        if e.in_sum2.shape[0] > 1:
            return torch.as_tensor(e.in_sum2.sum(0) / max(float(e.counts.sum()), 1.0), dtype=torch.float32)
        return torch.as_tensor(self.imatrix.for_tensor(ref.gguf_name), dtype=torch.float32)

    def forward_cache(self) -> None:
        """Inputs of every layer (``self.h[i][c]``, ``[1, T, H]``) and base log-probs per held-out chunk."""
        import torch

        r = self.runner
        keep = r.device if r.resident else torch.device("cpu")
        with torch.no_grad():
            h = [r.embed([c]) for c in self.ids]
            self.h: list[list[Any]] = [[x.to(keep) for x in h]]
            for i in self.progress(range(r.n_layers), total=r.n_layers, desc="held-out pass", unit="layer"):
                with r.on_device(i):
                    h = [r.layer(i, x.to(r.device), self.ctxs(x)) for x in h]
                self.h.append([x.to(keep) for x in h])
            self.base_lp = [sens.log_probs(r.head(x.to(r.device)))[0] for x in h]
            nll = [-lp[:-1].gather(1, torch.as_tensor(c[1:], device=lp.device)[:, None]).mean()
                   for lp, c in zip(self.base_lp, self.ids, strict=True)]
            self.base_nll = float(torch.stack(nll).mean())

    def fisher_and_proxies(self) -> None:
        """Backward from the top with sampled labels; the proxies of each tensor as soon as its Fisher is done."""
        import torch

        r = self.runner
        k_draws = max(1, self.s.fisher_draws)
        mine = self.fisher_chunks()
        by_layer: dict[int | None, list[TensorRef]] = {}
        for ref in self.refs:
            by_layer.setdefault(ref.layer, []).append(ref)
        head_params = [r.lm_head.weight]
        acc = self.accumulate_on
        fisher_head = torch.zeros_like(r.lm_head.weight, dtype=torch.float32, device=acc)
        grads: dict[int, list[Any]] = {}
        with torch.enable_grad():
            for c in mine:
                # labels drawn per chunk from their own stream, so any split of the chunks draws the same ones
                gen = torch.Generator(device="cpu").manual_seed(self.s.seed * 1_000_003 + c)
                x = self.h[-1][c].to(r.device).detach().requires_grad_(True)
                with weight_grads(head_params):
                    lp = sens.log_probs(r.head(x))[0]
                    probs = lp.detach().exp().cpu()
                    row = []
                    for k in range(k_draws):
                        y = torch.multinomial(probs, 1, generator=gen).to(lp.device)
                        x.grad = None
                        lp.gather(1, y).sum().backward(retain_graph=k < k_draws - 1)
                        fisher_head += head_params[0].grad.float().to(acc).pow(2)
                        head_params[0].grad = None
                        row.append(x.grad.detach())
                grads[c] = row
            for i in self.progress(range(r.n_layers - 1, -1, -1), total=r.n_layers, desc="fisher + proxies",
                                   unit="layer"):
                refs = by_layer.get(i, [])
                params = [ref.module.weight for ref in refs]
                fisher = [torch.zeros_like(p, dtype=torch.float32, device=acc) for p in params]
                with r.on_device(i), weight_grads(params):
                    for c in mine:
                        x = self.h[i][c].to(r.device).detach().requires_grad_(True)
                        out = r.layer(i, x, self.ctxs(x))
                        for k in range(k_draws):
                            x.grad = None
                            out.backward(grads[c][k], retain_graph=k < k_draws - 1)
                            for f, p in zip(fisher, params, strict=True):
                                f += p.grad.float().to(acc).pow(2)
                                p.grad = None
                            grads[c][k] = x.grad.detach()
                self._proxies(refs, [f / k_draws for f in self.sum_fisher(fisher)])
        emb_refs = by_layer.get(None, [])
        fisher_head = self.sum_fisher([fisher_head])[0]
        for ref in emb_refs:
            if ref.kind == "token_embd":
                f = self.sum_fisher([self._embedding_fisher(grads)])[0]
                if r.tied:
                    f += fisher_head
                self._proxies([ref], [f / k_draws])
            else:
                self._proxies([ref], [fisher_head / k_draws])

    def fisher_chunks(self) -> list[int]:
        """The held-out chunks whose Fisher this process computes (all of them; ranks share them out)."""
        return list(range(len(self.ids)))

    def sum_fisher(self, fishers: list[Any]) -> list[Any]:
        """Fisher sums over every process's chunks (one process: as they are)."""
        return fishers

    def _embedding_fisher(self, grads: dict[int, list[Any]]) -> Any:
        import torch

        w = self.runner.decoder.embed_tokens.weight
        acc = self.accumulate_on
        f = torch.zeros_like(w, dtype=torch.float32, device=acc)
        scale = self.runner.embed_scale
        for c, row in grads.items():
            uniq, inv = torch.unique(torch.as_tensor(self.ids[c], device=acc), return_inverse=True)
            for g in row:
                d = torch.zeros(len(uniq), w.shape[1], device=acc).index_add_(0, inv, g[0].float().to(acc) * scale)
                f[uniq] += d.pow(2)
        return f

    def _proxies(self, refs: list[TensorRef], fishers: list[Any]) -> None:
        """Both proxies for every candidate of ``refs``. Tensors that read the same input (q/k/v, gate/up) share
        an imatrix, so their sampled rows go through each codec in one call (codec calls cost mostly per call)."""
        import torch

        dev = self.runner.device  # the codecs and the proxies' sums run where the model runs
        groups: dict[tuple[Any, ...], list[int]] = {}
        for n, ref in enumerate(refs):
            imat = self._imat(ref)
            key = (tuple(ref.candidates), ref.shape[1], None if imat is None else imat.numpy().tobytes())
            groups.setdefault(key, []).append(n)
        for members in groups.values():
            parts = []
            for n in members:
                w = refs[n].module.weight.detach()
                rows = sens.row_sample(w.shape[0], self.s.proxy_rows * (4 if refs[n].layer is None else 1))
                parts.append((refs[n], w[rows.to(w.device)].to(dev, torch.float32),
                              fishers[n][rows.to(fishers[n].device)].to(dev), w.shape[0] / len(rows)))
            first = parts[0][0]
            imat = self._imat(first)
            imat = None if imat is None else imat.to(dev)
            stacked = torch.cat([p[1] for p in parts])
            h = None if self.rounders is None else self.rounders.second_moments(first.gguf_name, dev)
            for t in first.candidates:
                if t == cand.TOP:
                    for ref, *_ in parts:
                        self.records[ref.gguf_name].setdefault(t, {}).update(proxy_imatrix=0.0, proxy_fisher=0.0)
                    continue
                deq = self.round_trip(first, stacked, t, imat)
                start = 0
                for ref, sub, fsub, scale in parts:
                    dw = deq[start:start + len(sub)] - sub
                    start += len(sub)
                    rec = self.records[ref.gguf_name].setdefault(t, {})
                    rec["proxy_imatrix"] = scale * (sens.imatrix_proxy(dw, imat) if h is None
                                                    else sens.hessian_proxy(dw, h))
                    rec["proxy_fisher"] = scale * sens.fisher_proxy(dw, fsub, self.n_tokens)

    def measure_pairs(self) -> list[tuple[TensorRef, str]]:
        """The (tensor, format) pairs to measure for the settings' mode."""
        if self.s.measure == "none":
            return []
        out = []
        sample = None
        if self.s.measure == "sample":
            kinds: dict[int, list[str]] = {}
            for ref in self.refs:
                if ref.layer is not None:
                    kinds.setdefault(ref.layer, []).append(ref.kind)
            sample = sens.measurement_sample(kinds, self.runner.n_layers, self.s.sample_layers)
        for ref in self.refs:
            types = [t for t in ref.candidates if t != cand.TOP]
            if sample is not None:
                if ref.layer is not None and (ref.layer, ref.kind) not in sample:
                    continue
                types = sens.sample_types(ref.candidates, whole_model=ref.layer is None)
            out.extend((ref, t) for t in types)
        return out

    def measure(self, pairs: list[tuple[TensorRef, str]]) -> None:
        """Quantize one tensor at a time and re-run from its layer's cached input; record the mean KLD."""
        import torch

        r = self.runner
        for ref, t in self.progress(pairs, total=len(pairs), desc="measure KLD", unit="pair"):
            wq = self.round_trip(ref, ref.module.weight.to(r.device), t, self._imat(ref))
            klds = []
            with torch.no_grad(), swapped_weight(ref.module, wq):
                for c, ids in enumerate(self.ids):
                    if ref.kind == "token_embd":
                        logits = r.forward_from(0, r.embed([ids]))
                    elif ref.layer is None:
                        logits = r.head(self.h[-1][c].to(r.device))
                    else:
                        x = self.h[ref.layer][c].to(r.device)
                        logits = r.forward_from(ref.layer, x, self.ctxs(x))
                    klds.append(sens.mean_kld(self.base_lp[c], logits[0]))
            self.records[ref.gguf_name][t]["measured_kld"] = sum(klds) / len(klds)

    def fit_and_predict(self) -> dict[str, Any]:
        """Fit both proxies to the measurements, keep the better one, and predict every pair."""
        kinds, pi, pf, meas = [], [], [], []
        for ref in self.refs:
            for rec in self.records[ref.gguf_name].values():
                if rec.get("measured_kld") is not None:
                    kinds.append(ref.kind)
                    pi.append(rec["proxy_imatrix"])
                    pf.append(rec["proxy_fisher"])
                    meas.append(rec["measured_kld"])
        fits = [sens.fit_proxy("fisher", kinds, pf, meas), sens.fit_proxy("imatrix", kinds, pi, meas)]
        chosen = sens.best_fit(fits)
        for ref in self.refs:
            for t, rec in self.records[ref.gguf_name].items():
                if t == cand.TOP:
                    rec["predicted_kld"] = 0.0
                elif rec.get("measured_kld") is not None:
                    rec["predicted_kld"] = rec["measured_kld"]
                elif chosen is None:
                    rec["predicted_kld"] = rec["proxy_fisher"]
                else:
                    rec["predicted_kld"] = chosen.predict(ref.kind, rec["proxy_" + chosen.proxy])
        return {"chosen": chosen.proxy if chosen else "fisher (unfitted, no measurements)",
                "fits": [f.to_dict() for f in fits if f is not None]}

    def table(self) -> dict[str, Any]:
        out = {}
        for ref in self.refs:
            entry = {"hf_name": ref.hf_name, "kind": ref.kind, "layer": ref.layer, "shape": list(ref.shape),
                     "imatrix": self.imatrix.for_tensor(ref.gguf_name) is not None, "candidates": {}}
            for t in ref.candidates:
                rec = self.records[ref.gguf_name].get(t, {})
                nb = cand.nbytes(t, ref.shape)
                n = ref.shape[0] * ref.shape[1]
                entry["candidates"][t] = {"bytes": nb, "bpw": round(8.0 * nb / n, 4),
                                          **{k: _sig(v) for k, v in rec.items()}}
            out[ref.gguf_name] = entry
        return out


def _sig(v: Any) -> Any:
    return float(f"{v:.6g}") if isinstance(v, float) else v
