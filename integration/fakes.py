"""Local stand-ins for Google's identity endpoints and an ID-token-checking proxy.

Nothing on this machine can reach Google, so the tests run:

- :class:`FakeGoogle`: the GCE metadata server (``/computeMetadata/v1/...``: access and ID
  tokens), an OAuth token endpoint (``/token``: what a service-account key's ``token_uri``
  points to) and the IAM Credentials ``generateIdToken`` method. ID tokens are real JWTs
  (HS256, signed with a test secret) with ``aud``, ``exp`` and ``email`` claims.
- :class:`BearerProxy`: an Identity-Aware-Proxy-like reverse proxy in front of the MLflow
  server: it forwards a request only if it carries ``Authorization: Bearer <ID token>`` with
  a valid signature, the expected audience and an ``exp`` in the future; otherwise 401.

Both are threaded HTTP servers on 127.0.0.1 and record every token they issue or see, so the
tests can check that no token value ever appears in a log line.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

SECRET = b"kvx-test-signing-secret"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(claims: dict[str, Any]) -> str:
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(claims).encode())
    signature = hmac.new(SECRET, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(signature)}"


def verify_jwt(token: str) -> dict[str, Any] | None:
    try:
        header, payload, signature = token.split(".")
    except ValueError:
        return None
    expected = _b64(hmac.new(SECRET, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(expected, signature):
        return None
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


class _Server:
    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> _Server:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeGoogle(_Server):
    def __init__(self, email: str = "pipelines@kvx-test.iam.gserviceaccount.com") -> None:
        super().__init__(_GoogleHandler)
        self.email = email
        self.lifetime = 3600.0
        self.issued: list[str] = []
        self.iam_calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def id_token(self, audience: str, email: str | None = None) -> str:
        now = time.time()
        token = make_jwt({"aud": audience, "email": email or self.email, "iat": int(now),
                          "exp": now + self.lifetime, "iss": "https://accounts.google.com",
                          "nonce": len(self.issued)})
        with self.lock:
            self.issued.append(token)
        return token

    def access_token(self) -> str:
        token = f"ya29.fake-access-{len(self.issued)}-{time.time_ns()}"
        with self.lock:
            self.issued.append(token)
        return token


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        return None

    def _send(self, status: int, body: bytes | str, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""


class _GoogleHandler(_Handler):
    @property
    def google(self) -> FakeGoogle:
        return self.server.owner  # type: ignore[attr-defined,no-any-return]

    def do_GET(self) -> None:
        url = urlparse(self.path)
        metadata = {"Metadata-Flavor": "Google"}
        if self.headers.get("Metadata-Flavor") != "Google" and url.path.startswith("/computeMetadata"):
            self._send(403, "missing Metadata-Flavor header", "text/plain")
            return
        if url.path in {"/", "/computeMetadata/v1/"} or url.path == "/computeMetadata/v1":
            self._send(200, "ok", "text/plain", metadata)
        elif url.path.endswith("/service-accounts/default/identity"):
            audience = parse_qs(url.query).get("audience", [""])[0]
            self._send(200, self.google.id_token(audience), "text/plain", metadata)
        elif url.path.endswith("/service-accounts/default/token"):
            body = json.dumps({"access_token": self.google.access_token(), "expires_in": 3600,
                               "token_type": "Bearer"})
            self._send(200, body, "application/json", metadata)
        elif url.path.endswith("/service-accounts/default/email"):
            self._send(200, self.google.email, "text/plain", metadata)
        elif url.path.endswith("/service-accounts/default/") or url.path.endswith("/service-accounts/default"):
            body = json.dumps({"email": self.google.email, "aliases": ["default"],
                               "scopes": ["https://www.googleapis.com/auth/cloud-platform"]})
            self._send(200, body, "application/json", metadata)
        elif url.path.endswith("/project/project-id"):
            self._send(200, "kvx-test", "text/plain", metadata)
        else:
            self._send(404, "not found", "text/plain", metadata)

    def do_POST(self) -> None:
        url = urlparse(self.path)
        body = self._body()
        if url.path == "/token":
            # A service-account key's JWT bearer grant; target_audience asks for an ID token.
            form = parse_qs(body.decode())
            assertion = form.get("assertion", [""])[0]
            claims = json.loads(base64.urlsafe_b64decode(assertion.split(".")[1] + "=="))
            if "target_audience" in claims:
                token = self.google.id_token(claims["target_audience"], claims.get("iss"))
                self._send(200, json.dumps({"id_token": token}))
            else:
                self._send(200, json.dumps({"access_token": self.google.access_token(), "expires_in": 3600,
                                            "token_type": "Bearer"}))
        elif url.path.endswith(":generateIdToken"):
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("Bearer ya29.fake-access"):
                self._send(401, json.dumps({"error": {"code": 401, "message": "no access token"}}))
                return
            request = json.loads(body or b"{}")
            account = url.path.split("/serviceAccounts/")[1].split(":")[0]
            self.google.iam_calls.append({"account": account, **request})
            self._send(200, json.dumps({"token": self.google.id_token(request["audience"], account)}))
        else:
            self._send(404, "not found", "text/plain")


class BearerProxy(_Server):
    """Forwards to ``upstream`` only requests bearing a valid ID token for ``audience``."""

    def __init__(self, upstream_port: int, audience: str) -> None:
        super().__init__(_ProxyHandler)
        self.upstream_port = upstream_port
        self.audience = audience
        self.accepted = 0
        self.rejected: list[str] = []
        self.tokens_seen: set[str] = set()
        self.revoked: set[str] = set()


class _ForwardingHandler(_Handler):
    def _pass_on(self, upstream_port: int, body: bytes) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in {"host", "authorization", "connection"}}
        connection.request(self.command, self.path, body=body or None, headers=headers)
        response = connection.getresponse()
        data = response.read()
        passthrough = {k: v for k, v in response.getheaders()
                       if k.lower() not in {"content-length", "transfer-encoding", "connection", "content-type"}}
        self._send(response.status, data, response.getheader("Content-Type", "application/json"), passthrough)
        connection.close()


class _ProxyHandler(_ForwardingHandler):
    def _forward(self) -> None:
        proxy: BearerProxy = self.server.owner  # type: ignore[attr-defined]
        body = self._body()
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        claims = verify_jwt(token) if token else None
        reason = None
        if claims is None:
            reason = "no valid bearer token"
        elif claims.get("aud") != proxy.audience:
            reason = "wrong audience"
        elif claims["exp"] < time.time():
            reason = "expired token"
        elif token in proxy.revoked:
            reason = "revoked token"
        if token:
            proxy.tokens_seen.add(token)
        if reason:
            proxy.rejected.append(reason)
            self._send(401, json.dumps({"error_code": "UNAUTHENTICATED", "message": reason}))
            return
        proxy.accepted += 1
        self._pass_on(proxy.upstream_port, body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward


class RecordingProxy(_Server):
    """Forwards every request to ``upstream_port`` and records it: (method, path, body)."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(_RecordingHandler)
        self.upstream_port = upstream_port
        self.requests: list[tuple[str, str, str]] = []


class _RecordingHandler(_ForwardingHandler):
    def _forward(self) -> None:
        proxy: RecordingProxy = self.server.owner  # type: ignore[attr-defined]
        body = self._body()
        proxy.requests.append((self.command, self.path.split("?")[0], body.decode("utf-8", "replace")))
        self._pass_on(proxy.upstream_port, body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward
