"""A stand-in for a hosted registry's token issuer (Harbor's core service, ACR's token endpoint) on loopback.

It implements the distribution token-authentication spec as the real registry checks it:
- `GET /token?service=&scope=&account=` with HTTP Basic credentials or none (scope may repeat); a wrong password is
  401; anonymous callers get pull on the `public` repositories and nothing else; a known user gets the actions it
  asked for (pull, push, delete) on any repository;
- the answer is `{"token", "access_token", "expires_in", "issued_at"}`;
- the token is a JWT signed RS256 with a self-signed certificate sent in its `x5c` header, which the registry
  trusts through `auth.token.rootcertbundle`; claims `iss`, `sub`, `aud` (the service), `exp`, `nbf`, `iat`, `jti`
  and `access: [{"type", "name", "actions"}]`.
`issued` counts the tokens given out (the client is meant to reuse one until it expires).
"""

from __future__ import annotations

import base64
import datetime
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from tests.loopback import send_json, start

SERVICE = "flagrelease-registry"
ISSUER = "flagrelease-token-issuer-standin"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenIssuer:
    users: dict[str, str]
    public: set[str] = field(default_factory=set)
    ttl_s: int = 300
    issued: int = 0
    refused: int = 0

    def __post_init__(self) -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                            .not_valid_before(now - datetime.timedelta(minutes=5))
                            .not_valid_after(now + datetime.timedelta(days=1))
                            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                                         key_encipherment=False, data_encipherment=False,
                                                         key_agreement=False, crl_sign=False, encipher_only=False,
                                                         decipher_only=False), critical=True)
                            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                            .sign(self._key, hashes.SHA256()))
        self._lock = threading.Lock()

    def write_certificate(self, path: Path) -> Path:
        path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        return path

    def grant(self, user: str | None, scopes: list[str]) -> list[dict[str, object]]:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = [a for a in actions.split(",") if a]
            allowed = wanted if user is not None else [a for a in wanted if a == "pull" and name in self.public]
            if kind == "repository" and allowed:
                access.append({"type": kind, "name": name, "actions": allowed})
        return access

    def token(self, user: str | None, scopes: list[str]) -> dict[str, object]:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256",
                  "x5c": [base64.b64encode(self.certificate.public_bytes(serialization.Encoding.DER)).decode()]}
        claims = {"iss": ISSUER, "sub": user or "", "aud": SERVICE, "exp": now + self.ttl_s, "nbf": now - 1,
                  "iat": now, "jti": secrets.token_hex(8), "access": self.grant(user, scopes)}
        signed = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self._key.sign(signed.encode(), padding.PKCS1v15(), hashes.SHA256())
        with self._lock:
            self.issued += 1
        value = f"{signed}.{_b64url(signature)}"
        return {"token": value, "access_token": value, "expires_in": self.ttl_s,
                "issued_at": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat()}

    def authenticate(self, header: str | None) -> tuple[bool, str | None]:
        """(accepted, user): no header is anonymous; a wrong password is refused."""
        if not header:
            return True, None
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        user, _, password = base64.b64decode(encoded).decode().partition(":")
        return user in self.users and self.users[user] == password, user

    def serve(self) -> tuple[ThreadingHTTPServer, str]:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                url = urlparse(self.path)
                query = parse_qs(url.query)
                accepted, user = issuer.authenticate(self.headers.get("Authorization"))
                if url.path != "/token" or query.get("service") != [SERVICE]:
                    return self._json(404, {"errors": [{"code": "NOT_FOUND", "message": "unknown service"}]})
                if not accepted:
                    with issuer._lock:
                        issuer.refused += 1
                    return self._json(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
                self._json(200, issuer.token(user, query.get("scope", [])))

            def _json(self, status: int, body: dict) -> None:
                send_json(self, status, body)

            def log_message(self, *args: object) -> None:
                pass

        server = start(Handler)
        return server, f"http://127.0.0.1:{server.server_address[1]}/token"
