"""Signing keys as Better Auth's jwt() plugin makes and publishes them (one per
keyPairConfig.alg it offers), and tokens signed with them."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from tests.support import new_user


@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str
    private: Any
    jwk: dict[str, Any]

    def token(self, claims: dict[str, Any], **header: Any) -> str:
        headers = {"kid": self.kid, **header}
        return jwt.encode(claims, self.private, algorithm=self.alg, headers=headers)


def new_key(alg: str = "EdDSA") -> SigningKey:
    """A key pair for `alg` (Better Auth's keyPairConfig.alg: EdDSA, ES256, ES512, RS256,
    PS256), its public half as Better Auth publishes it: {alg, crv?, ...jwk, kid}."""
    private: Any
    if alg == "EdDSA":
        private, algorithm = ed25519.Ed25519PrivateKey.generate(), OKPAlgorithm
    elif alg in ("ES256", "ES512"):
        curve = ec.SECP256R1() if alg == "ES256" else ec.SECP521R1()
        private, algorithm = ec.generate_private_key(curve), ECAlgorithm
    else:
        private, algorithm = rsa.generate_private_key(65537, 2048), RSAAlgorithm
    kid = uuid.uuid4().hex
    public = algorithm.to_jwk(private.public_key(), as_dict=True)
    return SigningKey(kid, alg, private, {"alg": alg, **public, "kid": kid})


def claims(sub: str | None = None, ttl: int = 300, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": sub or new_user(), "iat": now, "exp": now + ttl, **extra}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
