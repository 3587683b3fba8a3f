//! Both kinds of key: a public key (EdDSA, RS256) verifies what its private half signed, and
//! nothing signed any other way.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tenant_auth::{AuthError, KeyError, TokenRules, Verifier};

const ED_PRIVATE: &[u8] = include_bytes!("keys/ed25519-private.pem");
const ED_PUBLIC: &[u8] = include_bytes!("keys/ed25519-public.pem");
const RSA_PRIVATE: &[u8] = include_bytes!("keys/rsa-private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("keys/rsa-public.pem");

fn claims() -> serde_json::Value {
    let now = tenant_auth::now_secs();
    json!({"tenant": "acme", "sub": "u", "iat": now, "exp": now + 60})
}

fn sign(alg: Algorithm, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims(), key).unwrap()
}

#[test]
fn a_public_key_verifies_its_private_halfs_tokens_and_nothing_else() {
    let ed = Verifier::public_key_pem(ED_PUBLIC, TokenRules::default(), "ed").unwrap();
    let rsa = Verifier::public_key_pem(RSA_PUBLIC, TokenRules::default(), "rsa").unwrap();
    assert_eq!(ed.algorithm(), Algorithm::EdDSA);
    assert_eq!(rsa.algorithm(), Algorithm::RS256);
    let ed_token = sign(
        Algorithm::EdDSA,
        &EncodingKey::from_ed_pem(ED_PRIVATE).unwrap(),
    );
    let rsa_token = sign(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
    );
    assert_eq!(ed.verify(&ed_token).unwrap().tenant, "acme");
    assert_eq!(rsa.verify(&rsa_token).unwrap().tenant, "acme");
    // Each accepts its own algorithm only.
    assert!(matches!(
        ed.verify(&rsa_token),
        Err(AuthError::WrongAlgorithm(_))
    ));
    assert!(matches!(
        rsa.verify(&ed_token),
        Err(AuthError::WrongAlgorithm(_))
    ));
    // `alg` confusion: an HS256 token "signed" with the public key as the secret.
    for (v, public) in [(&ed, ED_PUBLIC), (&rsa, RSA_PUBLIC)] {
        let forged = sign(Algorithm::HS256, &EncodingKey::from_secret(public));
        assert!(v.verify(&forged).is_err(), "{v:?} refuses an HS256 token");
    }
    // Another key pair's token does not verify.
    let other = sign(
        Algorithm::EdDSA,
        &EncodingKey::from_ed_pem(include_bytes!("keys/ed25519-other-private.pem")).unwrap(),
    );
    assert_eq!(ed.verify(&other).unwrap_err(), AuthError::BadSignature);
}

#[test]
fn a_private_key_or_garbage_is_not_a_public_key() {
    for pem in [ED_PRIVATE, RSA_PRIVATE] {
        assert!(matches!(
            Verifier::public_key_pem(pem, TokenRules::default(), "k.pem"),
            Err(KeyError::PrivateKey { .. })
        ));
    }
    for pem in [
        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".as_slice(),
        b"not a pem",
    ] {
        assert!(matches!(
            Verifier::public_key_pem(pem, TokenRules::default(), "k.pem"),
            Err(KeyError::NotAKey { .. })
        ));
    }
    let missing = Verifier::from_settings(
        None,
        Some(std::path::Path::new("/nonexistent/k.pem")),
        TokenRules::default(),
    )
    .unwrap_err();
    assert!(
        missing.to_string().contains("/nonexistent/k.pem"),
        "{missing}"
    );
}
