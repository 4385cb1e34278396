"""A stand-in for the root relay in tests: `sftp -D "python3 -I -S sftp_tee.py AUDIT OUT"`
runs this instead of sftp-server. It starts sftp-server, passes bytes both ways, feeds
them to the auditor (loaded from its file, as under -I -S nothing else is importable)
and writes each operation to OUT as a JSON line. Standard library only."""

import importlib.util
import json
import os
import subprocess
import sys
import threading

SFTP_SERVER = "/usr/lib/openssh/sftp-server"


def load(path: str):
    spec = importlib.util.spec_from_file_location("sftp_audit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    audit_path, out_path = sys.argv[1], sys.argv[2]
    auditor = load(audit_path).SftpAuditor()
    lock = threading.Lock()
    out = open(out_path, "w")  # noqa: SIM115 - written by both pumps until the end

    def record(ops) -> None:
        for op in ops:
            out.write(json.dumps(op) + "\n")
        out.flush()

    server = subprocess.Popen([SFTP_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)

    def pump(src: int, dst: int, feed, close_dst) -> None:
        while chunk := os.read(src, 65536):
            with lock:
                record(feed(chunk))
            os.write(dst, chunk)
        close_dst()

    upstream = threading.Thread(target=pump, args=(0, server.stdin.fileno(), auditor.feed_request,
                                                   server.stdin.close))
    upstream.start()
    pump(server.stdout.fileno(), 1, auditor.feed_response, lambda: os.close(1))
    upstream.join()
    server.wait()
    with lock:
        record(auditor.finish())
        out.write(json.dumps({"counters": auditor.counters, "stopped": auditor.stopped}) + "\n")
    out.close()


if __name__ == "__main__":
    main()
