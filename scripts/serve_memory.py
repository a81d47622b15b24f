#!/usr/bin/env python3
"""Peak RSS of `gps-seg serve` under N concurrent large-image requests (issue 27, case 11).

Starts the server on 127.0.0.1 (port 0), sends N concurrent POSTs of a 16-bit RGB PNG of
W×H pixels (flat, so the file is small and the decoded image is large) split over one or
more tasks, and reads VmHWM / VmRSS from /proc/PID/status. Bounded: every socket has a
timeout, the server is stopped with SIGTERM at the end (SIGKILL after 30 s).

    scripts/serve_memory.py --bin target/release/gps-seg --model m.onnx --requests 9
    scripts/serve_memory.py ... --tasks 2 --requests 18 -- --max-inflight-bytes 1073741824
"""
import argparse
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib


def png16(w, h):
    """A flat 16-bit RGB PNG (deflate of zero rows): small file, w·h·6 bytes decoded."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    z = zlib.compressobj(9)
    row = b"\0" * (1 + 6 * w)
    out = []
    for _ in range(h):
        out.append(z.compress(row))
    out.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(out)) + chunk(b"IEND", b"")


def status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def post(addr, task, body, out, i):
    try:
        s = socket.create_connection(addr, timeout=120)
        s.settimeout(120)
        head = (f"POST /v1/segment?task={task} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        s.sendall(head + body)
        data = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            data += b
        s.close()
        out[i] = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "closed"
    except OSError as e:
        out[i] = type(e).__name__


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tasks", type=int, default=1)
    ap.add_argument("--requests", type=int, default=9)
    ap.add_argument("--width", type=int, default=7300)
    ap.add_argument("--height", type=int, default=5440)
    ap.add_argument("extra", nargs="*", help="more `serve` flags (after --)")
    a = ap.parse_args()
    body = png16(a.width, a.height)
    cmd = [a.bin, "serve", "--port", "0", "--threads", "1", "--queue", "8", "--timeout-s", "300"]
    for t in range(a.tasks):
        cmd += ["--task", f"t{t}={a.model}"]
    cmd += a.extra
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = p.stdout.readline().strip()
        host, port = line.rsplit("//", 1)[1].rsplit(":", 1)
        addr = (host, int(port))
        idle_kb = status_kb(p.pid, "VmRSS")
        out = [None] * a.requests
        th = [threading.Thread(target=post, args=(addr, f"t{i % a.tasks}", body, out, i))
              for i in range(a.requests)]
        t0 = time.time()
        for t in th:
            t.start()
        for t in th:
            t.join(timeout=300)
        hwm_kb = status_kb(p.pid, "VmHWM")
        codes = {}
        for c in out:
            codes[c] = codes.get(c, 0) + 1
        print(f"image {a.width}x{a.height} 16-bit RGB, {len(body)} bytes; {a.requests} requests "
              f"over {a.tasks} task(s); flags {' '.join(a.extra) or '(defaults)'}")
        print(f"answers {dict(sorted(codes.items(), key=lambda kv: str(kv[0])))} in {time.time() - t0:.1f} s")
        print(f"RSS idle {idle_kb / 1024:.0f} MiB, peak (VmHWM) {hwm_kb / 1024:.0f} MiB "
              f"= {hwm_kb / 1024 / 1024:.2f} GiB")
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


if __name__ == "__main__":
    sys.exit(main())
