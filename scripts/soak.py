#!/usr/bin/env python3
"""Soak test of failover through the HTTP endpoint (not part of CI).

Starts N workers at fixed loopback addresses and `moeshard serve` over them, records the
fault-free (greedy) output of every prompt, then runs C concurrent clients sending R requests in
all while a chaos loop SIGKILLs a random worker and restarts it at the same address, again and
again. Reports requests that failed, outputs that differ from the fault-free run (target: 0 and
0), the kills, and the coordinator's peak resident memory (VmHWM).

    cargo build --release
    python3 scripts/soak.py --bin target/release/moeshard --transport quic

Only the Python standard library is needed.
"""

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROMPTS = [
    "What is a mixture of experts?",
    "Write a haiku about routers.",
    "Explain attention in one sentence.",
    "List three prime numbers.",
    "Why is the sky blue?",
    "Translate 'hello' into French.",
    "What is 17 times 23?",
    "Name a large language model.",
    "Describe a cat to a fish.",
    "Summarise the plot of Hamlet.",
    "What does QUIC stand for?",
    "Give me a random word.",
    "Count from one to ten.",
    "Tell a short joke.",
    "What is the capital of Peru?",
    "Compose a limerick about GPUs.",
]


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    def __init__(self, args, port):
        self.args, self.port, self.proc = args, port, None
        self.addr = f"127.0.0.1:{port}"

    def start(self):
        cmd = [self.args.bin, "worker", "--model", self.args.model, "--listen", self.addr,
               "--transport", self.args.transport, "--cluster-key-file", self.args.key]
        # A restarted worker may find its port still held for a moment: retry briefly.
        for _ in range(50):
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         stdin=subprocess.DEVNULL, text=True)
            line = self.proc.stdout.readline()
            if line.startswith("moeshard worker listening on"):
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()
                return
            self.proc.wait()
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.addr} did not start")

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def post(url, body, timeout):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def complete(base, prompt, max_tokens, timeout=300):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return post(base + "/v1/completions", body, timeout)["choices"][0]["text"]


def peak_rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/moeshard"))
    ap.add_argument("--model", default=os.path.join(ROOT, "tests/fixtures/qwen3_moe_tiny"))
    ap.add_argument("--transport", default="grpc", choices=["grpc", "quic"])
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=320)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--kill-every", type=float, default=1.5,
                    help="mean seconds between two kills")
    ap.add_argument("--down-for", type=float, default=1.0,
                    help="mean seconds a killed worker stays down")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rpc-timeout", default="5")
    ap.add_argument("--replicas", default="1")
    args = ap.parse_args()
    rng = random.Random(args.seed)

    key_path = os.path.join("/tmp", f"moeshard-soak-{os.getpid()}.key")
    with open(key_path, "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    os.chmod(key_path, 0o600)
    args.key = key_path

    kind = socket.SOCK_DGRAM if args.transport == "quic" else socket.SOCK_STREAM
    workers = [Worker(args, free_port(kind)) for _ in range(args.workers)]
    for w in workers:
        w.start()
    http_port = free_port()
    base = f"http://127.0.0.1:{http_port}"
    serve = subprocess.Popen(
        [args.bin, "serve", "--model", args.model, "--listen", f"127.0.0.1:{http_port}",
         "--workers", ",".join(w.addr for w in workers), "--transport", args.transport,
         "--cluster-key-file", key_path, "--rpc-timeout", args.rpc_timeout,
         "--replicas", args.replicas],
        stdout=subprocess.DEVNULL, stderr=open("/tmp/moeshard-soak-serve.log", "w"))
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                break
            except (urllib.error.URLError, ConnectionError):
                if serve.poll() is not None:
                    raise RuntimeError("serve exited; see /tmp/moeshard-soak-serve.log")
                time.sleep(0.1)
        print(f"serve up at {base} over {args.workers} {args.transport} workers", flush=True)

        baseline = {}
        for p in PROMPTS:
            baseline[p] = complete(base, p, args.max_tokens)
        print(f"fault-free outputs of {len(PROMPTS)} prompts recorded", flush=True)

        stop = threading.Event()
        kills = []

        def chaos():
            while not stop.is_set():
                if stop.wait(rng.expovariate(1.0 / args.kill_every)):
                    break
                w = rng.choice(workers)
                w.kill()
                kills.append((time.time(), w.addr))
                stop.wait(rng.expovariate(1.0 / args.down_for))
                w.start()

        lock = threading.Lock()
        next_req = [0]
        failed, differ, done = [], [], [0]

        def client(cid):
            while True:
                with lock:
                    i = next_req[0]
                    if i >= args.requests:
                        return
                    next_req[0] += 1
                p = PROMPTS[i % len(PROMPTS)]
                try:
                    got = complete(base, p, args.max_tokens)
                    if got != baseline[p]:
                        with lock:
                            differ.append((i, p))
                except Exception as e:  # noqa: BLE001 - every failure is counted
                    body = ""
                    if isinstance(e, urllib.error.HTTPError):
                        body = e.read().decode(errors="replace")[:300]
                    with lock:
                        failed.append((i, p, repr(e), body))
                with lock:
                    done[0] += 1

        started = time.time()
        chaos_t = threading.Thread(target=chaos, daemon=True)
        chaos_t.start()
        clients = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        stop.set()
        chaos_t.join()
        took = time.time() - started
        peak = peak_rss_kb(serve.pid)
        report = {
            "transport": args.transport,
            "workers": args.workers,
            "clients": args.clients,
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "seconds": round(took, 1),
            "kills": len(kills),
            "failed": len(failed),
            "differ": len(differ),
            "coordinator_peak_rss_mib": round(peak / 1024, 1) if peak else None,
        }
        print(json.dumps(report, indent=2))
        for f in failed[:10]:
            print("FAILED", f, file=sys.stderr)
        for d in differ[:10]:
            print("DIFFERS", d, file=sys.stderr)
        return 0 if not failed and not differ else 1
    finally:
        serve.send_signal(signal.SIGKILL)
        serve.wait()
        for w in workers:
            w.kill()
        os.unlink(key_path)


if __name__ == "__main__":
    sys.exit(main())
