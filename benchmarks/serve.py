"""Serving throughput and latency: Loom's OpenAI-compatible server with and without continuous
batching, against llama.cpp's own OpenAI server (`llama_cpp.server`) on the GGUF export of the
same model, at 1, 8, 32 and 128 concurrent clients.

    .venv/bin/python benchmarks/serve.py                                  # ~20 min on a quiet 2-core CPU
    .venv/bin/python benchmarks/serve.py --levels=1,8 --rounds=1 --no_record   # a quick check

Model: the `small` preset's shape (Llama, d 512, 8 layers, 8 heads / 4 kv, vocab 4096, 512
positions) with random weights (seed 0) in float32 and the embedded corpus's sentencepiece
tokenizer, written once as a Hugging Face directory (`models.hf.save`) that Loom serves, and
exported from it with `python -m inference.export --type=f32` for llama.cpp. Every server runs
in a process of its own, all three started before the first round:
  loom          `python -m inference.serve --max_slots=64` (continuous batching; prefix cache on)
  loom_serial   `python -m inference.serve --max_slots=1 --prefix_cache=0` (one request at a time)
  llama.cpp     `python -m llama_cpp.server --n_ctx=512 --n_threads=<cores> --n_batch=512
                --interrupt_requests=False` (llama-cpp-python's server, which serves one request at
                a time; by default a new request interrupts the running one's stream)
Load: at concurrency c, c clients each send `--per_client` requests back to back (c = 1: 8;
c = 8: 2; 32 and 128: 1), streamed `/v1/completions` with a ~40-token prompt taken from the
embedded corpus (a different one per request, the same set for every server), `max_tokens`
`--new` (32), greedy. Per level and server: requests/s and generated tokens/s over the level's
wall time, time to first token (request sent -> first streamed token) and inter-token latency
(gaps between a request's streamed tokens), p50 and p99 over all requests of the level. Rounds
interleave the servers level by level (`--rounds`, medians with min-max over rounds). The load
generator (httpx, asyncio) runs in this process on the same cores as the servers, the same for
every side. Writes benchmarks/records/serve_cpu.json (unless --no_record); never asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from benchmarks import records  # noqa: E402

SIDES = ("loom", "loom_serial", "llama.cpp")
PER_CLIENT = {1: 8, 8: 2}


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def prepare(work: pathlib.Path, preset: str) -> tuple[pathlib.Path, pathlib.Path, list[str]]:
    """(HF dir, GGUF file, prompts): the preset's shape with random weights, its tokenizer, and
    corpus snippets of ~40 tokens."""
    from configs import pretrain
    from data.sources import specs_from_config
    from data.tokenizer import from_config
    from models import hf
    from models import transformer as T
    from models.config import ModelConfig

    config = pretrain.get_config(preset)
    cfg = ModelConfig.from_dict({**config.model.to_dict(), "dtype": "float32", "param_dtype": "float32"})
    hf_dir = work / f"{preset}_random"
    specs = specs_from_config(config.data.sources)
    tok = from_config(config.data.tokenizer, specs)
    if not (hf_dir / "config.json").is_file():
        model = T.build(cfg, seed=0)
        hf.save(model, hf_dir, dtype="float32")
        tok_file = work / "tokenizer.model"
        tok.save(tok_file)
        ids = hf.save_sentencepiece_tokenizer(tok_file, hf_dir, model_max_length=cfg.max_seq_len)
        conf = json.loads((hf_dir / "config.json").read_text())
        (hf_dir / "config.json").write_text(json.dumps({**conf, **ids}, indent=2, sort_keys=True) + "\n")
    gguf = work / f"{preset}_random.gguf"
    if not gguf.is_file():
        subprocess.run([sys.executable, "-m", "inference.export", f"--checkpoint={hf_dir}", f"--out={gguf}",
                        "--type=f32"], cwd=records.REPO, check=True)
    from data.sources import read_all

    texts = [r["text"] for r in read_all(specs[0]) if len(r["text"]) > 400][:400]
    prompts = []
    for t in texts:
        ids = tok.encode(t)[:40]
        prompts.append(tok.decode(ids))
    return hf_dir, gguf, prompts


class Server:
    def __init__(self, name: str, cmd: list[str], port: int, health: str, log: pathlib.Path):
        self.name, self.port, self.health = name, port, health
        self.base = f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=records.REPO, stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 900.0) -> None:
        import httpx2 as httpx

        t = time.time()
        while time.time() - t < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.base + self.health, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} was not ready in {timeout}s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def _one(client, base, model, prompt, new):
    """(ttft seconds, [inter-token gaps], tokens, text) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0.0, "stream": True}
    t0 = time.perf_counter()
    stamps, text = [], []
    async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{base}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                c = chunk["choices"][0]
                if c.get("text") or c.get("finish_reason") is None:
                    stamps.append(time.perf_counter())
                    text.append(c.get("text") or "")
    gaps = list(np.diff(stamps)) if len(stamps) > 1 else []
    return (stamps[0] - t0 if stamps else float("nan")), gaps, len(stamps), "".join(text)


def run_level(server: Server, model: str, prompts: list[str], clients: int, per_client: int, new: int) -> dict:
    import httpx2 as httpx

    async def main():
        limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
        async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
            async def worker(w):
                out = []
                for j in range(per_client):
                    p = prompts[(w * per_client + j) % len(prompts)]
                    out.append(await _one(client, server.base, model, p, new))
                return out

            t = time.perf_counter()
            res = await asyncio.gather(*(worker(w) for w in range(clients)))
            return time.perf_counter() - t, [x for r in res for x in r]

    wall, results = asyncio.run(main())
    tokens = sum(r[2] for r in results)
    ttft = [r[0] for r in results]
    gaps = [g for r in results for g in r[1]]
    return {"wall": wall, "requests": len(results), "tokens": tokens, "req_per_s": len(results) / wall,
            "tok_per_s": tokens / wall, "ttft_p50": float(np.percentile(ttft, 50)),
            "ttft_p99": float(np.percentile(ttft, 99)), "itl_p50": float(np.percentile(gaps, 50)) if gaps else 0.0,
            "itl_p99": float(np.percentile(gaps, 99)) if gaps else 0.0, "first_text": results[0][3]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--levels", default="1,8,32,128", help="concurrent clients, comma-separated")
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (>= 5 for a record), after one untimed")
    ap.add_argument("--new", type=int, default=32, help="max_tokens of every request")
    ap.add_argument("--per_client", type=int, default=0, help="requests per client (0: 8 at c=1, 2 at c=8, else 1)")
    ap.add_argument("--work", default=str(records.REPO / ".cache" / "bench_serve"))
    ap.add_argument("--name", default="serve_cpu")
    ap.add_argument("--no_record", action="store_true")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    sides = records.comma_list(ap, "--sides", args.sides, SIDES)
    if "llama.cpp" in sides:
        try:
            import llama_cpp.server  # noqa: F401
        except ImportError as e:
            ap.error(f"the llama.cpp side needs llama-cpp-python with its server extras "
                     f"(pip install 'llama-cpp-python[server]'): {e}; or pass --sides=loom,loom_serial")
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    hf_dir, gguf, prompts = prepare(work, args.preset)
    model = "bench"
    threads = len(os.sched_getaffinity(0))
    cmds = {
        "loom": [sys.executable, "-m", "inference.serve", f"--checkpoint={hf_dir}", "--max_slots=64",
                 f"--model_id={model}"],
        "loom_serial": [sys.executable, "-m", "inference.serve", f"--checkpoint={hf_dir}", "--max_slots=1",
                        "--prefix_cache=0", f"--model_id={model}"],
        "llama.cpp": [sys.executable, "-m", "llama_cpp.server", f"--model={gguf}", "--n_ctx=512",
                      f"--n_threads={threads}", "--n_batch=512", f"--model_alias={model}", "--host=127.0.0.1",
                      "--interrupt_requests=False"],
    }
    health = {"loom": "/health", "loom_serial": "/health", "llama.cpp": "/v1/models"}
    servers = {}
    try:
        for s in sides:
            port = _free_port()
            cmd = cmds[s] + [f"--port={port}"]
            servers[s] = Server(s, cmd, port, health[s], work / f"{s}.log")
            servers[s].wait()  # one at a time: compiles do not overlap
            print(f"{s} ready on port {port}", flush=True)
        raw: dict = {s: {c: [] for c in levels} for s in sides}
        for r in range(args.rounds + 1):  # round 0 warms every server and level up, untimed
            for c in levels:
                per = args.per_client or PER_CLIENT.get(c, 1)
                for s in sides:
                    m = run_level(servers[s], model, prompts, c, per, args.new)
                    if r:
                        raw[s][c].append(m)
                    print(f"round {r} c={c:>3} {s:<12} {m['tok_per_s']:8.1f} tok/s  {m['req_per_s']:6.2f} req/s  "
                          f"ttft p50 {m['ttft_p50'] * 1e3:8.1f} ms  itl p50 {m['itl_p50'] * 1e3:6.1f} ms", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    rows = []
    for c in levels:
        base = raw[sides[-1]][c] if "llama.cpp" in sides else raw[sides[0]][c]
        for s in sides:
            ms = raw[s][c]
            summ = {k: records.summarize([m[k] for m in ms]) for k in
                    ("req_per_s", "tok_per_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99")}
            ratio = records.ratio_summary([m["tok_per_s"] for m in ms], [m["tok_per_s"] for m in base])
            rows.append([s, c, records.spread(summ["req_per_s"], "{:,.2f}"), records.spread(summ["tok_per_s"]),
                         f"{ratio['median']:.2f}x", f"{summ['ttft_p50']['median'] * 1e3:,.0f}",
                         f"{summ['ttft_p99']['median'] * 1e3:,.0f}", f"{summ['itl_p50']['median'] * 1e3:,.1f}",
                         f"{summ['itl_p99']['median'] * 1e3:,.1f}"])
    ref = "llama.cpp" if "llama.cpp" in sides else sides[0]
    table = records.table(
        f"Serving `{args.preset}` (random weights, float32) on this CPU: streamed /v1/completions, ~40-token "
        f"prompts, {args.new} new tokens, greedy; medians over {args.rounds} rounds (min-max)",
        ["server", "clients", "requests/s", "tokens/s", f"tokens/s vs {ref}", "TTFT p50 ms", "TTFT p99 ms",
         "ITL p50 ms", "ITL p99 ms"], rows)
    records.print_table(table)
    agree = {s: raw[s][levels[0]][0]["first_text"] for s in sides}
    print("first request's greedy text per server:", json.dumps(agree, ensure_ascii=False)[:600])
    if not args.no_record:
        method = ("Three OpenAI-compatible servers, each its own process, on the same model: Loom's inference.serve "
                  "with 64 slots (continuous batching) and with 1 slot (requests one at a time), and "
                  "llama-cpp-python's llama_cpp.server on the f32 GGUF export (inference.export). Streamed "
                  "completions from an asyncio httpx client in the benchmark's process; a token is a streamed "
                  "chunk. Round 0 is an untimed warm-up of every server and level.")
        records.write_record(args.name, title="Serving on CPU", tables=[table], method=method,
                             params=vars(args), results={"raw": raw, "first_texts": agree})


if __name__ == "__main__":
    main()
