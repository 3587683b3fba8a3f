//! Issue 18, item 11: the read model holds callers to the inventory's tenancy. The variants
//! routes take the inventory's bearer token (verified by the shared `tenant-auth` code): no token
//! is 401, another tenant's path is 404 (as the inventory answers for another tenant's variant),
//! the token's own tenant is 200. With each kind of key: EdDSA and RS256 public keys (the read
//! model cannot mint), and the HS256 secret.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use read_model::http::{router, ReadState};
use tenant_auth::{TokenRules, Verifier};
use testkit::TestDb;
use tower::ServiceExt;
use uuid::Uuid;

const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tenant-auth/tests/keys/");
const SECRET: &[u8] = b"test-secret-of-at-least-32-bytes-for-hs256";

fn key(name: &str) -> Vec<u8> {
    std::fs::read(format!("{KEYS}{name}")).expect("test key")
}

/// A verifier and a way to sign tokens it accepts.
struct Kind {
    name: &'static str,
    verifier: Verifier,
    alg: Algorithm,
    signing: EncodingKey,
}

fn kinds() -> Vec<Kind> {
    let public = |n: &str| Verifier::public_key_pem(&key(n), TokenRules::default(), n).unwrap();
    vec![
        Kind {
            name: "EdDSA",
            verifier: public("ed25519-public.pem"),
            alg: Algorithm::EdDSA,
            signing: EncodingKey::from_ed_pem(&key("ed25519-private.pem")).unwrap(),
        },
        Kind {
            name: "RS256",
            verifier: public("rsa-public.pem"),
            alg: Algorithm::RS256,
            signing: EncodingKey::from_rsa_pem(&key("rsa-private.pem")).unwrap(),
        },
        Kind {
            name: "HS256",
            verifier: Verifier::hs256(SECRET, TokenRules::default()),
            alg: Algorithm::HS256,
            signing: EncodingKey::from_secret(SECRET),
        },
    ]
}

fn token(alg: Algorithm, key: &EncodingKey, tenant: &str) -> String {
    let now = tenant_auth::now_secs();
    let claims = serde_json::json!({"tenant": tenant, "sub": "u", "iat": now, "exp": now + 60});
    jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
}

async fn get(app: &axum::Router, path: &str, token: Option<&str>) -> (StatusCode, String) {
    let mut req = Request::get(path);
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let res = app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_variants_routes_answer_only_the_tokens_own_tenant() {
    let db = TestDb::empty().await;
    read_model::migrate(&db.pool).await.expect("migrations");
    let (mine, theirs) = (Uuid::now_v7(), Uuid::now_v7());
    sqlx::query("INSERT INTO rm_variant (tenant_id, variant_id, quantity) VALUES ('acme', $1, 7), ('globex', $2, 9)")
        .bind(mine)
        .bind(theirs)
        .execute(&db.pool)
        .await
        .unwrap();
    let all = kinds();
    for kind in &all {
        let app = router(ReadState {
            pool: db.pool.clone(),
            health: Arc::default(),
            metrics: None,
            verifier: Arc::new(kind.verifier.clone()),
        });
        let name = kind.name;
        let acme = token(kind.alg, &kind.signing, "acme");
        for path in [
            "/tenants/acme/variants".to_string(),
            format!("/tenants/acme/variants/{mine}"),
        ] {
            let (s, b) = get(&app, &path, None).await;
            assert_eq!(
                s,
                StatusCode::UNAUTHORIZED,
                "{name} {path} without a token: {b}"
            );
            let (s, b) = get(&app, &path, Some("not.a.jwt")).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{name} {path} garbage: {b}");
        }
        let (s, b) = get(&app, "/tenants/acme/variants", Some(&acme)).await;
        assert_eq!(s, StatusCode::OK, "{name}: {b}");
        assert!(
            b.contains(&mine.to_string()) && !b.contains(&theirs.to_string()),
            "{name}: {b}"
        );
        let (s, b) = get(&app, &format!("/tenants/acme/variants/{mine}"), Some(&acme)).await;
        assert_eq!(s, StatusCode::OK, "{name}: {b}");
        assert!(b.contains(r#""quantity":7"#), "{name}: {b}");
        for path in [
            "/tenants/globex/variants".to_string(),
            format!("/tenants/globex/variants/{theirs}"),
        ] {
            let (s, b) = get(&app, &path, Some(&acme)).await;
            assert_eq!(
                s,
                StatusCode::NOT_FOUND,
                "{name} {path} with acme's token: {b}"
            );
            assert!(!b.contains("\"quantity\""), "{name}: {b}");
        }
        // A token signed with any other kind of key is refused.
        for other in all.iter().filter(|o| o.name != kind.name) {
            let t = token(other.alg, &other.signing, "acme");
            let (s, b) = get(&app, "/tenants/acme/variants", Some(&t)).await;
            assert_eq!(
                s,
                StatusCode::UNAUTHORIZED,
                "{name} given an {} token: {b}",
                other.name
            );
        }
        // Health and metrics stay open: they say nothing of any tenant's stock.
        let (s, _) = get(&app, "/healthz", None).await;
        assert_eq!(s, StatusCode::OK, "{name}");
    }
}
