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
use thiserror::Error;

use crate::error::ApiError;
use crate::AppState;

/// Shortest accepted HS256 secret: RFC 7518 (3.2) asks for a key at least as long as the hash
/// output (256 bits); a shorter one can be brute-forced offline from any captured token.
pub const MIN_SECRET_LEN: usize = 32;

/// Seconds of clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECS: u64 = 5;

/// Why the token settings cannot be used.
#[derive(Debug, Error)]
pub enum AuthConfigError {
    /// The HS256 secret is too short.
    #[error(
        "the JWT secret is {0} bytes long; it must be at least {MIN_SECRET_LEN} bytes \
         (generate one with `openssl rand -base64 48`)"
    )]
    SecretTooShort(usize),
}

/// Checks that `secret` is long enough to sign HS256 tokens safely.
pub fn check_secret(secret: &[u8]) -> Result<(), AuthConfigError> {
    if secret.len() < MIN_SECRET_LEN {
        return Err(AuthConfigError::SecretTooShort(secret.len()));
    }
    Ok(())
}

/// Optional claim checks beyond signature and lifetime.
#[derive(Debug, Clone, Default)]
pub struct TokenRules {
    /// When set, a token's `iss` must equal it (and minted tokens carry it).
    pub issuer: Option<String>,
    /// When set, a token's `aud` must contain it (and minted tokens carry it).
    pub audience: Option<String>,
}

/// The claims the service reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The tenant: 1-64 characters of `A-Z a-z 0-9 _ -` (it becomes part of event subjects).
    pub tenant: String,
    /// The user; recorded in the ledger and as `userId` of events.
    pub sub: String,
    /// Expiry, seconds since the epoch (required).
    pub exp: u64,
    /// Issued at, seconds since the epoch; a token issued in the future is refused.
    #[serde(default)]
    pub iat: u64,
    /// Not before, seconds since the epoch; refused until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issuer (checked when the service is configured with one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience (checked when the service is configured with one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// Signing and verification keys for one shared secret.
#[derive(Clone)]
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    rules: TokenRules,
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
        Self::with_rules(secret, TokenRules::default())
    }

    /// Keys for `secret` that also check (and mint) `iss` and `aud` as `rules` say.
    pub fn with_rules(secret: &[u8], rules: TokenRules) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        let mut required = vec!["exp", "sub"];
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        // Without a configured audience an `aud` claim is not ours to judge: ignore it rather
        // than refuse every token of an issuer that always sets one.
        validation.validate_aud = rules.audience.is_some();
        if let Some(iss) = &rules.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        if let Some(aud) = &rules.audience {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            rules,
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
            nbf: None,
            iss: self.rules.issuer.clone(),
            aud: self.rules.audience.clone(),
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
                    ErrorKind::ImmatureSignature => {
                        "the bearer token is not valid yet (its nbf is in the future); retry then, or check the issuer's clock".to_string()
                    }
                    ErrorKind::InvalidIssuer => format!(
                        "the bearer token's iss must be {:?}",
                        self.rules.issuer.as_deref().unwrap_or_default()
                    ),
                    ErrorKind::InvalidAudience => format!(
                        "the bearer token's aud must include {:?}",
                        self.rules.audience.as_deref().unwrap_or_default()
                    ),
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
        // jsonwebtoken does not check iat; a token "issued" in the future is forged or minted by
        // a clock that is wrong, and either way cannot be trusted to expire when it says.
        if c.iat > now_secs() + LEEWAY_SECS {
            return Err(ApiError::Unauthorized(
                "the bearer token's iat is in the future; check the issuer's clock".into(),
            ));
        }
        if !valid_tenant(&c.tenant) {
            return Err(ApiError::Unauthorized(
                "the token's tenant claim must be 1-64 characters of A-Z a-z 0-9 _ -".into(),
            ));
        }
        // Control characters (NUL above all) cannot be stored in the ledger's text columns and
        // have no business in a user id.
        if c.sub.is_empty() || c.sub.len() > 200 || c.sub.chars().any(char::is_control) {
            return Err(ApiError::Unauthorized(
                "the token's sub claim must be 1-200 characters, none of them control characters"
                    .into(),
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
