//! Bearer-token authentication: HS256 JWTs carrying the tenant.
//!
//! The tenant comes only from a verified token, never from a path or body, so a caller can only
//! ever name ids inside its own tenant; every query filters by it.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::AppState;

/// The claims the service reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The tenant: 1-64 characters of `A-Z a-z 0-9 _ -` (it becomes part of event subjects).
    pub tenant: String,
    /// The user; recorded in the ledger and as `userId` of events.
    pub sub: String,
    /// Expiry, seconds since the epoch (required).
    pub exp: u64,
    /// Issued at, seconds since the epoch.
    #[serde(default)]
    pub iat: u64,
}

/// Signing and verification keys for one shared secret.
#[derive(Clone)]
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.write_str("JwtKeys(..)")
    }
}

impl JwtKeys {
    /// Keys for `secret` (HS256). Only HS256 is accepted, so a token cannot pick a weaker or
    /// asymmetric algorithm (`alg` confusion).
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// A token for `tenant` and user `sub`, valid for `ttl_secs`.
    pub fn mint(&self, tenant: &str, sub: &str, ttl_secs: u64) -> Result<String, ApiError> {
        if !valid_tenant(tenant) {
            return Err(ApiError::BadRequest(format!(
                "tenant {tenant:?} must be 1-64 characters of A-Z a-z 0-9 _ -"
            )));
        }
        let now = now_secs();
        let claims = Claims {
            tenant: tenant.into(),
            sub: sub.into(),
            exp: now + ttl_secs,
            iat: now,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| ApiError::Internal(format!("signing a token: {e}")))
    }

    /// Verifies `token` and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| {
                ApiError::Unauthorized(match e.kind() {
                    ErrorKind::ExpiredSignature => "the bearer token has expired".to_string(),
                    ErrorKind::InvalidSignature => {
                        "the bearer token's signature does not verify".to_string()
                    }
                    ErrorKind::MissingRequiredClaim(c) => {
                        format!("the bearer token lacks the required claim {c:?}")
                    }
                    _ => format!("the bearer token is not a valid HS256 JWT: {e}"),
                })
            })?;
        let c = data.claims;
        if !valid_tenant(&c.tenant) {
            return Err(ApiError::Unauthorized(
                "the token's tenant claim must be 1-64 characters of A-Z a-z 0-9 _ -".into(),
            ));
        }
        if c.sub.is_empty() || c.sub.len() > 200 {
            return Err(ApiError::Unauthorized(
                "the token's sub claim must be 1-200 characters".into(),
            ));
        }
        Ok(c)
    }
}

/// Whether `t` is a valid tenant id (the outbox's token alphabet).
pub fn valid_tenant(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
        let value = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
            ApiError::Unauthorized("missing Authorization: Bearer <token> header".into())
        })?;
        let value = value
            .to_str()
            .map_err(|_| ApiError::Unauthorized("the Authorization header is not ASCII".into()))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| {
                ApiError::Unauthorized("the Authorization header must be `Bearer <token>`".into())
            })?;
        let claims = state.jwt.verify(token.trim())?;
        Ok(Caller {
            tenant: claims.tenant,
            user: claims.sub,
        })
    }
}
