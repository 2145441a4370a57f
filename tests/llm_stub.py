"""An OpenAI-compatible chat endpoint on 127.0.0.1 for label.py's tests: no network, answers that follow from the
prompt. The explainer answers "LABEL: letter X" with X the token it sees marked most often; the scorer answers yes
for the windows that contain X. Failures (HTTP statuses, timeouts, non-JSON bodies, replies without yes/no) can be
queued to test the client's retries and records."""

from __future__ import annotations

import collections
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Stub:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 (random port), in a thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
                try:
                    self.send_response(status)
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up (timeout test)
                    pass

            def do_GET(self):
                if self.path.endswith("/models"):
                    self._send(200, json.dumps({"data": [{"id": "stub"}]}).encode())
                else:
                    self._send(404, b"")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests += 1
                    failure = stub.failures.pop(0) if stub.failures else None
                if failure == "timeout":
                    time.sleep(1.0)
                    return self._send(200, b"{}")
                if failure is not None:
                    return self._send(failure, b"busy", {"Retry-After": "0"} if failure == 429 else None)
                system, user = body["messages"][0]["content"], body["messages"][1]["content"]
                if "LABEL:" in system:
                    marks = collections.Counter(re.findall(r"<<(.*?)>>", user))
                    letter = min(marks, key=lambda t: (-marks[t], t)) if marks else "?"
                    if letter in stub.broken_labels:
                        return self._send(200, b"<html>not json</html>")
                    text = f"LABEL: letter {letter}"
                elif stub.garbage_scorer:
                    text = "I am not sure about any of these."
                else:
                    label = re.search(r'Label: "letter (.*?)"', user, re.DOTALL)
                    windows = re.findall(r"^Window (\d+): (.*)$", user, re.MULTILINE)
                    text = "\n".join(f"{i}: {'yes' if label and label.group(1) in t else 'no'}" for i, t in windows)
                self._send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def reset(self) -> None:
        self.requests = 0  # chat requests received
        self.failures: list = []  # statuses (or "timeout") for the next chat requests
        self.broken_labels: set[str] = set()  # explainer requests whose label would be one of these get a non-JSON body
        self.garbage_scorer = False  # scorer replies without any yes/no

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
