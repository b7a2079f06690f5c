#!/usr/bin/env python3
"""A tiny HTTP backend for the tunnel tests: answers every GET with its name, the path and the
X-Forwarded-For header it received."""
import http.server
import sys

NAME = sys.argv[1]
PORT = int(sys.argv[2])


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{NAME} path={self.path} xff={self.headers.get('X-Forwarded-For', '-')}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
