//! Bearer-token authentication: JWTs carrying the tenant.
//!
//! Verification is the shared `tenant-auth` crate's (the read model verifies the same tokens with
//! it); this module adds what only the inventory does: mint tokens ([`Minter`], `inventory
//! token`) and the request extractor ([`Caller`]). The tenant comes only from a verified token,
//! never from a path or body, so a caller can only ever name ids inside its own tenant; every
//! query filters by it.

use std::path::Path;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use crate::error::ApiError;
use crate::AppState;

pub use tenant_auth::{
    check_secret, valid_tenant, AuthError, Claims, KeyError, TokenRules, Verifier, LEEWAY_SECS,
    MIN_SECRET_LEN,
};

/// A key that signs tokens: the HS256 secret, or the private half of an EdDSA or RS256 key pair
/// (whose public half the services verify with).
#[derive(Clone)]
pub struct Minter {
    encoding: EncodingKey,
    algorithm: Algorithm,
    rules: TokenRules,
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        write!(f, "Minter({:?})", self.algorithm)
    }
}

impl Minter {
    /// Signs HS256 tokens with `secret`; minted tokens carry `rules`' `iss` and `aud`.
    pub fn hs256(secret: &[u8], rules: TokenRules) -> Self {
        Self {
            encoding: EncodingKey::from_secret(secret),
            algorithm: Algorithm::HS256,
            rules,
        }
    }

    /// Signs with a private key in PEM (PKCS#8): Ed25519 (`EdDSA`) or RSA (`RS256`), told apart
    /// by the key. `what` names the key's origin in errors.
    pub fn private_key_pem(pem: &[u8], rules: TokenRules, what: &str) -> Result<Self, KeyError> {
        let (encoding, algorithm) = if let Ok(k) = EncodingKey::from_ed_pem(pem) {
            (k, Algorithm::EdDSA)
        } else if let Ok(k) = EncodingKey::from_rsa_pem(pem) {
            (k, Algorithm::RS256)
        } else {
            return Err(KeyError::NotAKey {
                path: what.to_string(),
                expected: "an Ed25519 or RSA private key",
            });
        };
        Ok(Self {
            encoding,
            algorithm,
            rules,
        })
    }

    /// [`Minter::private_key_pem`] of the file at `path`.
    pub fn private_key_file(path: &Path, rules: TokenRules) -> Result<Self, KeyError> {
        let pem = tenant_auth::read_key_file(path)?;
        Self::private_key_pem(&pem, rules, &path.display().to_string())
    }

    /// The algorithm of the tokens it mints.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// A token for `tenant` and user `sub`, valid for `ttl_secs`.
    pub fn mint(&self, tenant: &str, sub: &str, ttl_secs: u64) -> Result<String, ApiError> {
        if !valid_tenant(tenant) {
            return Err(ApiError::BadRequest(format!(
                "tenant {tenant:?} must be 1-64 characters of A-Z a-z 0-9 _ -"
            )));
        }
        let now = tenant_auth::now_secs();
        let claims = Claims {
            tenant: tenant.into(),
            sub: sub.into(),
            exp: now + ttl_secs,
            iat: now,
            nbf: None,
            iss: self.rules.issuer.clone(),
            aud: self.rules.audience.clone(),
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, &self.encoding)
            .map_err(|e| ApiError::Internal(format!("signing a token: {e}")))
    }
}

/// Signing and verification with one HS256 secret: for tests, benchmarks and a single service.
/// A service that only verifies takes a [`Verifier`].
#[derive(Clone, Debug)]
pub struct JwtKeys {
    minter: Minter,
    verifier: Verifier,
}

impl JwtKeys {
    /// Keys for `secret` (HS256).
    pub fn new(secret: &[u8]) -> Self {
        Self::with_rules(secret, TokenRules::default())
    }

    /// Keys for `secret` that also check (and mint) `iss` and `aud` as `rules` say.
    pub fn with_rules(secret: &[u8], rules: TokenRules) -> Self {
        Self {
            minter: Minter::hs256(secret, rules.clone()),
            verifier: Verifier::hs256(secret, rules),
        }
    }

    /// A token for `tenant` and user `sub`, valid for `ttl_secs`.
    pub fn mint(&self, tenant: &str, sub: &str, ttl_secs: u64) -> Result<String, ApiError> {
        self.minter.mint(tenant, sub, ttl_secs)
    }

    /// Verifies `token` and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        self.verifier.verify(token).map_err(ApiError::from)
    }
}

impl From<JwtKeys> for Verifier {
    fn from(k: JwtKeys) -> Self {
        k.verifier
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError::Unauthorized(e.to_string())
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The caller's tenant.
    pub tenant: String,
    /// The caller's user id (`sub`).
    pub user: String,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let claims = state
            .jwt
            .verify_authorization(parts.headers.get(AUTHORIZATION))?;
        Ok(Caller {
            tenant: claims.tenant,
            user: claims.sub,
        })
    }
}
