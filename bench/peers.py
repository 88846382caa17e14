"""The peers the engine is measured against in the same run, on the same requests.

- HF transformers + PEFT: `generate(adapter_names=[...])` on mixed-adapter batches of
  `concurrency` requests (static batching: the S-LoRA / Punica papers' baseline).
- the engine without LoRA (max_loras=0) on the base model: the LoRA overhead ratio.
- the engine with one adapter merged into the weights (W' = W + B A, a model directory of its
  own, max_loras=0): the upper bound for serving that one adapter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.harness import Summary, Tiers, summarize
from bench.targets import release_openmp_pools
from bench.workloads import Workload


@dataclass
class PeerResult:
    """Runs of one peer; the best (highest throughput) run is the figure, all runs are listed."""

    label: str
    runs: list[Summary] = field(default_factory=list)
    note: str = ""

    @property
    def best(self) -> Summary:
        return max(self.runs, key=lambda s: s.tokens_per_s)

    @property
    def tokens_per_s(self) -> float:
        return self.best.tokens_per_s


class HfPeftPeer:
    """HF + PEFT with every adapter the workload names loaded into one PeftModel."""

    def __init__(self, model_dir: Path, peft_dirs: dict[str, Path], device: str = "cpu", dtype: str = "float32"):
        import transformers
        from peft import PeftModel

        torch_dtype = getattr(torch, dtype)
        base = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
        # ignore_eos: every request generates exactly max_tokens, as the engine's requests do.
        base.generation_config.eos_token_id = None
        base.generation_config.pad_token_id = 0
        names = sorted(peft_dirs, key=lambda n: int(n[1:]))
        model = PeftModel.from_pretrained(base, peft_dirs[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(peft_dirs[name], adapter_name=name)
        self.model = model.eval()
        self.device = device

    def run(self, workload: Workload) -> Summary:
        """Static batches of `concurrency` requests in arrival order, as HF generate serves them.

        A batch's prompts are left-padded to its longest, and it decodes until its longest output
        is done; only the tokens each request asked for count as output. Its first token comes
        after the batch's prefill (timed by a 1-token generate, whose time is then left out), and
        its tokens are spread evenly over the rest of the batch's generate, as if streamed. So a
        request is done at its own last token, and the closed loop sends the next request then:
        request j of the next batch arrives at the j-th earliest finish of this one, and its TTFT
        counts the wait for the batch it is in to start.
        """
        if workload.arrival != "closed":
            raise ValueError("the HF + PEFT peer models a closed loop only")
        requests = workload.requests()
        timings = []
        prefill_s = prefill_cpu = 0.0
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(requests), workload.concurrency):
            batch = requests[i:i + workload.concurrency]
            width = max(len(r.prompt) for r in batch)
            new = max(r.max_tokens for r in batch)
            ids = torch.tensor([[0] * (width - len(r.prompt)) + r.prompt for r in batch], device=self.device)
            mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch],
                                device=self.device)
            names = [r.adapter if r.adapter is not None else "__base__" for r in batch]
            sent, sent_cpu = time.perf_counter(), time.process_time()
            with torch.inference_mode():
                self.model.generate(ids, attention_mask=mask, adapter_names=names, max_new_tokens=1,
                                    min_new_tokens=1, do_sample=False)
                first = time.perf_counter()
                prefill_cpu += time.process_time() - sent_cpu
                out = self.model.generate(ids, attention_mask=mask, adapter_names=names, max_new_tokens=new,
                                          min_new_tokens=new, do_sample=False)
            done = time.perf_counter()
            if out.shape[1] != width + new:
                raise RuntimeError(f"HF generated {out.shape[1] - width} tokens, asked for {new}")
            ttft = first - sent
            # In the timeline without the 1-token generates, as `wall` below.
            timings.append((batch, sent - prefill_s, ttft, (done - first - ttft) / max(1, new - 1)))
            prefill_s += ttft
        # The 1-token generates only time the prefill: their time is not part of serving the batch.
        wall = time.perf_counter() - start - prefill_s
        summary = summarize(static_batch_records(timings), wall, sum(len(r.prompt) for r in requests), Tiers())
        summary.cpu_s = time.process_time() - cpu - prefill_cpu
        release_openmp_pools()  # as InProcessTarget.detach: leave no pool to slow the next run's thread
        return summary


def static_batch_records(batches: list[tuple[list, float, float, float]]) -> list:
    """Records of a closed loop served by static batches, from each batch's (requests, start, TTFT,
    seconds per later token): a request's tokens stream from start + TTFT, one per step, and the
    first batch's requests arrive at its start, the next batch's at this one's finishes, earliest first."""
    from bench.harness import Record

    records, arrivals = [], []
    for batch, begin, ttft, step in batches:
        arrivals = arrivals or [begin] * len(batch)
        done = []
        for request, arrival in zip(batch, arrivals, strict=False):
            rec = Record(request.adapter, arrival)
            for k in range(request.max_tokens):
                rec.delta(begin + ttft + k * step, 1)
            done.append(rec)
        records += done
        arrivals = sorted(rec.last for rec in done)
    return records


def _key_of(target, name: str) -> str:
    return next(k for k in target.slots.keys() if k.split("@", 1)[0] == name)


def merged_matches(lora, merged, prompts: list[list[int]], new: int) -> int:
    """Greedy outputs of LoRA adapter a0 vs the model with a0 merged in: how many requests agree exactly."""
    from data_plane.engine.request import SamplingParams

    params = SamplingParams(max_tokens=new, ignore_eos=True)
    key = _key_of(lora, "a0")
    # Engine calls go through the engine thread: the Engine is not thread-safe.
    a = lora.loop.call(lambda e: e.generate(prompts, [key] * len(prompts), params)).result()
    b = merged.loop.call(lambda e: e.generate(prompts, None, params)).result()
    return sum(x.token_ids == y.token_ids for x, y in zip(a, b, strict=True))


def peers_section(bench):
    """LoRA engine vs HF + PEFT, vs itself without LoRA, vs a merged model, on the same requests."""
    from bench.artifacts import merge_into
    from bench.report import Check, Section, best, table
    from bench.sweeps import Held, interleave, warmed
    from bench.workloads import LengthDist

    p = bench.profile
    n = p.peer_adapters
    fixed = bench.workload(num_requests=p.peer_requests, num_adapters=n)
    var = fixed.with_(num_requests=p.peer_var_requests, prompt_len=LengthDist.parse(p.peer_var_prompt),
                      output_len=LengthDist.parse(p.peer_var_output))
    merged_dir = merge_into(bench.model_dir, bench.store.load("a0"), bench.workdir / "merged")
    peft = {f"a{i}": bench.store.peft_dir(f"a{i}", bench.workdir / "peft") for i in range(n)}
    fixed_2 = fixed.with_(num_requests=2, concurrency=2, output_len=LengthDist.parse("2"))

    def make_hf():
        peer = HfPeftPeer(bench.model_dir, peft, p.device, p.dtype)
        peer.run(fixed_2)  # first-call costs (the first mixed-adapter generate is several times slower)
        return peer

    make_lora = warmed(bench, n, max_loras=n)
    lora, base, hf = Held(make_lora, p.resident), Held(warmed(bench, 0, max_loras=0), p.resident), \
        Held(make_hf, p.resident)
    merged = Held(warmed(bench, 0, model=merged_dir, max_loras=0), p.resident)
    with make_lora() as check_lora, bench.target(model=merged_dir, max_loras=0) as check_merged:
        same = merged_matches(check_lora, check_merged, [r.prompt for r in fixed.requests()[:8]], 16)
    try:
        def on(held, workload):
            return lambda: held.run(lambda t: t.run(workload) if isinstance(t, HfPeftPeer) else bench.run(t, workload))

        runners = {"lora": on(lora, fixed), "base": on(base, fixed.with_(num_adapters=0)),
                   "lora1": on(lora, fixed.with_(num_adapters=1)), "merged": on(merged, fixed.with_(num_adapters=0)),
                   "hf": on(hf, fixed), "lora_v": on(lora, var), "base_v": on(base, var.with_(num_adapters=0)),
                   "hf_v": on(hf, var)}
        res = interleave(runners, p.peer_repeats)
    finally:
        for held in (lora, base, merged, hf):
            held.close()
    tps = {k: best(v).tokens_per_s for k, v in res.items()}
    per_cpu = {k: best(v, cpu=True).tokens_per_cpu_s for k, v in res.items()}

    def paired(a, b):
        return ", ".join(f"{x.tokens_per_s / y.tokens_per_s:.2f}" for x, y in zip(res[a], res[b], strict=True))

    def vs(k, ref):
        return [f"{tps[k] / tps[ref]:.2f}"]

    rows = [(f"engine + LoRA, {n} distinct adapters mixed in every batch", res["lora"], vs("lora", "lora")),
            ("engine + LoRA, every request on adapter a0", res["lora1"], vs("lora1", "lora")),
            ("engine, a0 merged into the weights (no LoRA at run time)", res["merged"], vs("merged", "lora")),
            ("engine without LoRA (base model, max_loras=0)", res["base"], vs("base", "lora")),
            (f"HF transformers + PEFT, static batches of {p.concurrency}, adapter_names mixed", res["hf"],
             vs("hf", "lora"))]
    rows_v = [(f"engine + LoRA, {n} distinct adapters", res["lora_v"], vs("lora_v", "lora_v")),
              ("engine without LoRA (base model)", res["base_v"], vs("base_v", "lora_v")),
              (f"HF transformers + PEFT, static batches of {p.concurrency}", res["hf_v"], vs("hf_v", "lora_v"))]
    sec = Section("peers", "Peers: HF + PEFT, the engine without LoRA, a merged model")
    sec.lines = [
        "Every peer gets the same requests (same prompts, adapters, lengths); peers run interleaved, "
        f"{p.peer_repeats} times each. HF + PEFT serves them as static batches of {p.concurrency} in arrival "
        "order: prompts left-padded to the batch's longest, decoding until its longest output is done (only "
        "requested tokens count). HF TTFT is a 1-token generate of the batch; its TPOT spreads the rest of the "
        "batch's generate evenly over the tokens, as if streamed.", "",
        "### Fixed lengths (HF's best case: one full batch, no padding)", "", f"Workload: {fixed.describe()}.", "",
        *table(rows, "peer", ["vs LoRA engine"]), "",
        "### Variable lengths", "", f"Workload: {var.describe()}.", "", *table(rows_v, "peer", ["vs LoRA engine"]),
        "", f"- paired per-repeat ratios, LoRA engine / HF + PEFT: fixed {paired('lora', 'hf')}; variable "
        f"{paired('lora_v', 'hf_v')}",
        f"- paired per-repeat ratios, LoRA engine / base: fixed {paired('lora', 'base')}; variable "
        f"{paired('lora_v', 'base_v')}",
        f"- merged-model check: greedy outputs (16 tokens) of LoRA a0 and of the merged model agree on "
        f"{same}/8 prompts (fp32 reassociation can flip near-tied argmaxes on a random model).",
        f"- LoRA engine serving one adapter / the merged upper bound: {tps['lora1'] / tps['merged']:.2f} "
        f"(per CPU-second: {per_cpu['lora1'] / per_cpu['merged']:.2f})",
        f"- noise gauge: the merged model and the base model run identical computation; their best runs "
        f"differ by {tps['merged'] / tps['base']:.2f}x in tokens/s and {per_cpu['merged'] / per_cpu['base']:.2f}x "
        "in tokens per CPU-second. Wall-clock ratios closer than that are not resolved on this machine."]
    gpu = p.device.startswith("cuda")
    need_hf, need_base = (10.0, 0.9) if gpu else (3.0, 0.85)
    for key, ref, what in (("lora", "hf", "fixed lengths"), ("lora_v", "hf_v", "variable lengths")):
        ratio = tps[key] / tps[ref]
        sec.checks.append(Check(f"{p.name}: LoRA engine vs HF + PEFT throughput, {what}",
                                f"{ratio:.2f}x ({tps[key]:.1f} vs {tps[ref]:.1f} tok/s); per CPU-second "
                                f"{per_cpu[key] / per_cpu[ref]:.2f}x", f">= {need_hf:g}x", ratio >= need_hf))
    for key, ref, what in (("lora", "base", "fixed lengths"), ("lora_v", "base_v", "variable lengths")):
        ratio = tps[key] / tps[ref]
        sec.checks.append(Check(f"{p.name}: LoRA ({n} distinct rank-{p.rank} adapters, concurrency "
                                f"{p.concurrency}) vs base model, {what}",
                                f"{ratio:.2f}x ({tps[key]:.1f} vs {tps[ref]:.1f} tok/s); per CPU-second "
                                f"{per_cpu[key] / per_cpu[ref]:.2f}x", f">= {need_base:g}x", ratio >= need_base))
    keys = ("lora", "lora1", "merged", "base", "hf", "lora_v", "base_v", "hf_v")
    return sec, {"labels": ["LoRA mixed", "LoRA one", "merged", "base", "HF+PEFT", "LoRA var", "base var",
                            "HF var"],
                 "tps": [tps[k] for k in keys], "all": [[s.tokens_per_s for s in res[k]] for k in keys]}
