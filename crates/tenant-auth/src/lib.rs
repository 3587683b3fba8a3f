//! Verifying the services' bearer tokens: JWTs carrying the caller's tenant.
//!
//! The inventory and its read model hold callers to one tenancy: the tenant comes only from a
//! verified token, never from a path or body. This crate is the one place that decides whether a
//! token is valid; it only **verifies**. Minting stays with the inventory (`inventory token`), so
//! a service that only reads can be given a key that cannot mint:
//!
//! - **EdDSA (Ed25519) or RS256**: the verifying services hold the public key
//!   ([`Verifier::public_key_pem`]); only the holder of the private key can mint. Prefer it
//!   whenever more than one service verifies.
//! - **HS256**: one shared secret ([`Verifier::hs256`]) both signs and verifies, so **every
//!   service that holds it can mint a token for any tenant**. Fine for one service; giving it to
//!   a read model makes that read model (its host, its environment, its backups) as trusted as
//!   the token issuer.
//!
//! Each verifier accepts exactly one algorithm (the one of its key), so a token cannot choose a
//! weaker one (`alg` confusion, e.g. an HS256 token "signed" with the RSA public key).

use std::path::Path;

use http::HeaderValue;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Shortest accepted HS256 secret: RFC 7518 (3.2) asks for a key at least as long as the hash
/// output (256 bits); a shorter one can be brute-forced offline from any captured token.
pub const MIN_SECRET_LEN: usize = 32;

/// Seconds of clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECS: u64 = 5;

/// Why a key setting cannot be used (at start-up).
#[derive(Debug, Error)]
pub enum KeyError {
    /// The HS256 secret is too short.
    #[error(
        "the JWT secret is {0} bytes long; it must be at least {MIN_SECRET_LEN} bytes \
         (generate one with `openssl rand -base64 48`)"
    )]
    SecretTooShort(usize),
    /// Neither a secret nor a public key was given.
    #[error(
        "no key to verify bearer tokens with: set the public key file (EdDSA or RS256, preferred) \
         or the HS256 secret"
    )]
    NoKey,
    /// Both a secret and a public key were given.
    #[error(
        "both an HS256 secret and a public key file are set; set only one (tokens are verified \
         with exactly one algorithm)"
    )]
    BothKeys,
    /// The key file cannot be read.
    #[error("cannot read the key file {path}: {source}")]
    Unreadable {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A private key where the public one belongs.
    #[error(
        "{path} holds a private key; a verifying service takes the public half only (make it \
         with `openssl pkey -in private.pem -pubout -out public.pem`)"
    )]
    PrivateKey {
        /// The file.
        path: String,
    },
    /// The key file holds no key of a supported kind.
    #[error(
        "{path} is not {expected} in PEM (make one with `openssl genpkey -algorithm ed25519 -out \
         private.pem` and `openssl pkey -in private.pem -pubout -out public.pem`)"
    )]
    NotAKey {
        /// The file.
        path: String,
        /// What was expected.
        expected: &'static str,
    },
}

/// Why a request's bearer token is refused (the request answers 401).
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("missing Authorization: Bearer <token> header")]
    MissingHeader,
    /// The header is not `Bearer <token>` in ASCII.
    #[error("the Authorization header must be `Bearer <token>`")]
    NotBearer,
    /// `exp` has passed.
    #[error("the bearer token has expired")]
    Expired,
    /// `nbf` is in the future.
    #[error(
        "the bearer token is not valid yet (its nbf is in the future); retry then, or check the \
         issuer's clock"
    )]
    NotYetValid,
    /// `iat` is in the future.
    #[error("the bearer token's iat is in the future; check the issuer's clock")]
    IssuedInFuture,
    /// `iss` is not the configured issuer.
    #[error("the bearer token's iss must be {0:?}")]
    WrongIssuer(String),
    /// `aud` does not include the configured audience.
    #[error("the bearer token's aud must include {0:?}")]
    WrongAudience(String),
    /// The signature does not verify with the service's key.
    #[error("the bearer token's signature does not verify")]
    BadSignature,
    /// The token names another algorithm than the service's key.
    #[error("the bearer token must be signed with {0:?}")]
    WrongAlgorithm(String),
    /// A required claim is absent.
    #[error("the bearer token lacks the required claim {0:?}")]
    MissingClaim(String),
    /// The `tenant` claim is not a tenant id.
    #[error("the token's tenant claim must be 1-64 characters of A-Z a-z 0-9 _ -")]
    BadTenant,
    /// The `sub` claim is empty, too long or holds control characters.
    #[error("the token's sub claim must be 1-200 characters, none of them control characters")]
    BadSub,
    /// Anything else: not a JWT, bad encoding, wrong claim types.
    #[error("the bearer token is not a valid {alg} JWT: {detail}")]
    Malformed {
        /// The expected algorithm.
        alg: String,
        /// The decoder's words.
        detail: String,
    },
}

/// Optional claim checks beyond signature and lifetime.
#[derive(Debug, Clone, Default)]
pub struct TokenRules {
    /// When set, a token's `iss` must equal it (and minted tokens carry it).
    pub issuer: Option<String>,
    /// When set, a token's `aud` must contain it (and minted tokens carry it).
    pub audience: Option<String>,
}

/// The claims the services read.
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

/// Checks that `secret` is long enough to sign HS256 tokens safely.
pub fn check_secret(secret: &[u8]) -> Result<(), KeyError> {
    if secret.len() < MIN_SECRET_LEN {
        return Err(KeyError::SecretTooShort(secret.len()));
    }
    Ok(())
}

/// Whether `t` is a valid tenant id (the outbox's token alphabet).
pub fn valid_tenant(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A key that verifies bearer tokens of one algorithm, with the claim rules.
#[derive(Clone)]
pub struct Verifier {
    decoding: DecodingKey,
    validation: Validation,
    algorithm: Algorithm,
    rules: TokenRules,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        write!(f, "Verifier({:?}, {:?})", self.algorithm, self.rules)
    }
}

impl Verifier {
    /// Verifies HS256 tokens signed with `secret`. The length is not checked here (a test may
    /// use any secret): check a configured one with [`check_secret`], as [`Verifier::from_settings`] does.
    pub fn hs256(secret: &[u8], rules: TokenRules) -> Self {
        Self::new(DecodingKey::from_secret(secret), Algorithm::HS256, rules)
    }

    /// Verifies tokens with a public key in PEM: Ed25519 (`EdDSA`) or RSA (`RS256`), told apart
    /// by the key itself. `what` names the key's origin in errors (e.g. its file).
    pub fn public_key_pem(pem: &[u8], rules: TokenRules, what: &str) -> Result<Self, KeyError> {
        // jsonwebtoken would take an RSA private key as a "public" one; a private key has no
        // business on a service that only verifies, so say so rather than verify with it.
        if String::from_utf8_lossy(pem).contains("PRIVATE KEY-----") {
            return Err(KeyError::PrivateKey {
                path: what.to_string(),
            });
        }
        if let Ok(k) = DecodingKey::from_ed_pem(pem) {
            return Ok(Self::new(k, Algorithm::EdDSA, rules));
        }
        if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Self::new(k, Algorithm::RS256, rules));
        }
        Err(KeyError::NotAKey {
            path: what.to_string(),
            expected: "an Ed25519 or RSA public key",
        })
    }

    /// The verifier a service's settings ask for: exactly one of an HS256 `secret` (at least
    /// [`MIN_SECRET_LEN`] bytes) and a `public_key_file` (PEM); empty values count as unset.
    pub fn from_settings(
        secret: Option<&str>,
        public_key_file: Option<&Path>,
        rules: TokenRules,
    ) -> Result<Self, KeyError> {
        let secret = secret.filter(|s| !s.is_empty());
        let file = public_key_file.filter(|p| !p.as_os_str().is_empty());
        match (secret, file) {
            (Some(_), Some(_)) => Err(KeyError::BothKeys),
            (None, None) => Err(KeyError::NoKey),
            (Some(s), None) => {
                check_secret(s.as_bytes())?;
                Ok(Self::hs256(s.as_bytes(), rules))
            }
            (None, Some(path)) => {
                let pem = read_key_file(path)?;
                Self::public_key_pem(&pem, rules, &path.display().to_string())
            }
        }
    }

    fn new(decoding: DecodingKey, algorithm: Algorithm, rules: TokenRules) -> Self {
        let mut validation = Validation::new(algorithm);
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
            decoding,
            validation,
            algorithm,
            rules,
        }
    }

    /// The one algorithm this verifier accepts.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The claim rules.
    pub fn rules(&self) -> &TokenRules {
        &self.rules
    }

    /// Verifies `token` and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidIssuer => {
                    AuthError::WrongIssuer(self.rules.issuer.clone().unwrap_or_default())
                }
                ErrorKind::InvalidAudience => {
                    AuthError::WrongAudience(self.rules.audience.clone().unwrap_or_default())
                }
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm => {
                    AuthError::WrongAlgorithm(format!("{:?}", self.algorithm))
                }
                ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
                _ => AuthError::Malformed {
                    alg: format!("{:?}", self.algorithm),
                    detail: e.to_string(),
                },
            })?;
        let c = data.claims;
        // jsonwebtoken does not check iat; a token "issued" in the future is forged or minted by
        // a clock that is wrong, and either way cannot be trusted to expire when it says.
        if c.iat > now_secs() + LEEWAY_SECS {
            return Err(AuthError::IssuedInFuture);
        }
        if !valid_tenant(&c.tenant) {
            return Err(AuthError::BadTenant);
        }
        // Control characters (NUL above all) cannot be stored in text columns and have no
        // business in a user id.
        if c.sub.is_empty() || c.sub.len() > 200 || c.sub.chars().any(char::is_control) {
            return Err(AuthError::BadSub);
        }
        Ok(c)
    }

    /// Verifies the token of an `Authorization: Bearer <token>` header (`None`: no header).
    pub fn verify_authorization(&self, header: Option<&HeaderValue>) -> Result<Claims, AuthError> {
        let value = header.ok_or(AuthError::MissingHeader)?;
        let value = value.to_str().map_err(|_| AuthError::NotBearer)?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or(AuthError::NotBearer)?;
        self.verify(token.trim())
    }
}

/// Reads a key file (PEM).
pub fn read_key_file(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Unreadable {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_need_exactly_one_key() {
        let r = TokenRules::default;
        assert!(matches!(
            Verifier::from_settings(None, None, r()),
            Err(KeyError::NoKey)
        ));
        assert!(matches!(
            Verifier::from_settings(Some(""), Some(Path::new("")), r()),
            Err(KeyError::NoKey)
        ));
        assert!(matches!(
            Verifier::from_settings(Some("x"), Some(Path::new("/k.pem")), r()),
            Err(KeyError::BothKeys)
        ));
        assert!(matches!(
            Verifier::from_settings(Some("short"), None, r()),
            Err(KeyError::SecretTooShort(5))
        ));
        let v = Verifier::from_settings(Some(&"k".repeat(32)), None, r()).unwrap();
        assert_eq!(v.algorithm(), Algorithm::HS256);
        assert!(matches!(
            Verifier::public_key_pem(b"not a key", r(), "k.pem"),
            Err(KeyError::NotAKey { .. })
        ));
    }

    #[test]
    fn the_header_must_be_bearer() {
        let v = Verifier::hs256(&[b'k'; 32], TokenRules::default());
        assert_eq!(
            v.verify_authorization(None).unwrap_err(),
            AuthError::MissingHeader
        );
        let basic = HeaderValue::from_static("Basic dTpw");
        assert_eq!(
            v.verify_authorization(Some(&basic)).unwrap_err(),
            AuthError::NotBearer
        );
        let junk = HeaderValue::from_static("Bearer not.a.jwt");
        assert!(matches!(
            v.verify_authorization(Some(&junk)).unwrap_err(),
            AuthError::Malformed { .. }
        ));
    }
}
