"""Probes for the network test bed: echo servers that answer with the
address they saw, and clients that measure round trips and loss.

    netprobe.py udp-echo PORT
    netprobe.py tcp-echo PORT
    netprobe.py udp-probe HOST PORT COUNT TIMEOUT_S [BIND_PORT]
    netprobe.py tcp-probe HOST PORT TIMEOUT_S

A probe prints one JSON object: answered, sent, rtts_ms, observed (the
"ip:port" each answer reported).
"""

import json
import socket
import sys
import time


def udp_echo(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    while True:
        data, addr = s.recvfrom(2048)
        s.sendto(data + b" " + f"{addr[0]}:{addr[1]}".encode(), addr)


def tcp_echo(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(16)
    while True:
        c, addr = s.accept()
        with c:
            c.recv(64)
            c.sendall(f"{addr[0]}:{addr[1]}".encode())


def udp_probe(host, port, count, timeout, bind_port=0):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", bind_port))
    s.settimeout(timeout)
    rtts, observed = [], []
    for i in range(count):
        t = time.monotonic()
        s.sendto(str(i).encode(), (host, port))
        deadline = t + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            s.settimeout(left)
            try:
                data, _ = s.recvfrom(2048)
            except socket.timeout:
                break
            seq, _, seen = data.decode().partition(" ")
            if seq == str(i):
                rtts.append((time.monotonic() - t) * 1000.0)
                observed.append(seen)
                break
    print(json.dumps({"sent": count, "answered": len(rtts), "rtts_ms": rtts, "observed": observed}))


def tcp_probe(host, port, timeout):
    deadline = time.monotonic() + timeout
    err = None
    while time.monotonic() < deadline:
        try:
            t = time.monotonic()
            c = socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
            rtt = (time.monotonic() - t) * 1000.0
            c.sendall(b"hi")
            seen = c.recv(64).decode()
            c.close()
            print(json.dumps({"sent": 1, "answered": 1, "rtts_ms": [rtt], "observed": [seen]}))
            return
        except OSError as e:
            err = str(e)
            time.sleep(0.05)
    print(json.dumps({"sent": 1, "answered": 0, "rtts_ms": [], "observed": [], "error": err}))


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "udp-echo":
        udp_echo(int(args[0]))
    elif cmd == "tcp-echo":
        tcp_echo(int(args[0]))
    elif cmd == "udp-probe":
        bind = int(args[4]) if len(args) > 4 else 0
        udp_probe(args[0], int(args[1]), int(args[2]), float(args[3]), bind)
    elif cmd == "tcp-probe":
        tcp_probe(args[0], int(args[1]), float(args[2]))
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
