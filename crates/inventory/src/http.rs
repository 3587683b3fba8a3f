//! The HTTP API: routes, request context (correlation id, trace context, idempotency key) and
//! the mapping of axum's own rejections to problem documents.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{problem_response, ApiError, ApiResult};
use crate::idempotency::{self, Claim};
use crate::model::*;
use crate::ops::{self, Command, Ctx, Outcome};
use crate::stock::{self, Cause};
use crate::AppState;

/// Header carrying the correlation id, in and out.
pub const CORRELATION_HEADER: &str = "x-correlation-id";
/// Header carrying the idempotency key.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
/// Response header set when an answer is a replay of a stored one.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// Correlation and trace context of one request, set by the correlation middleware.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    /// Taken from `X-Correlation-Id` or generated (UUID v7).
    pub correlation_id: String,
    /// The request's W3C `traceparent`, when valid.
    pub traceparent: Option<String>,
    /// The `Idempotency-Key`, when given.
    pub idempotency_key: Option<String>,
}

/// Whether `s` is an acceptable correlation id: 1-128 of `A-Z a-z 0-9 - _ . :`.
pub fn valid_correlation_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
}

async fn correlation(mut req: Request, next: Next) -> Response {
    let headers = req.headers();
    let given = headers.get(CORRELATION_HEADER).map(|v| v.to_str().ok());
    let correlation_id = match given {
        None => Uuid::now_v7().to_string(),
        Some(Some(s)) if valid_correlation_id(s) => s.to_string(),
        Some(_) => {
            let id = Uuid::now_v7().to_string();
            let mut resp = ApiError::BadRequest(
                "X-Correlation-Id must be 1-128 characters of A-Z a-z 0-9 - _ . :".into(),
            )
            .into_response();
            set_correlation(&mut resp, &id);
            return resp;
        }
    };
    let traceparent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|s| outbox::envelope::is_traceparent(s))
        .map(str::to_string);
    let idempotency_key = match headers.get(IDEMPOTENCY_HEADER) {
        None => None,
        Some(v) => match v.to_str().map_err(|_| ()).and_then(|s| {
            idempotency::check_key(s).map_err(|_| ())?;
            Ok(s.to_string())
        }) {
            Ok(k) => Some(k),
            Err(()) => {
                let mut resp = ApiError::BadRequest(format!(
                    "Idempotency-Key must be 1-{} visible ASCII characters",
                    idempotency::MAX_KEY_LEN
                ))
                .into_response();
                set_correlation(&mut resp, &correlation_id);
                return resp;
            }
        },
    };
    let span = tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), correlation_id = %correlation_id);
    req.extensions_mut().insert(RequestMeta {
        correlation_id: correlation_id.clone(),
        traceparent,
        idempotency_key,
    });
    let mut resp = tracing::Instrument::instrument(next.run(req), span).await;
    set_correlation(&mut resp, &correlation_id);
    resp
}

fn set_correlation(resp: &mut Response, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut()
            .insert(HeaderName::from_static(CORRELATION_HEADER), v);
    }
}

/// Largest request body: a reservation of 500 lines is about 60 KiB, so 1 MiB leaves room
/// without letting one request hold megabytes in memory.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// JSON body extractor whose rejections are problem documents. Beyond axum's `Json` it refuses
/// a body over [`MAX_BODY_BYTES`] with 413 and any string holding U+0000 with 422: PostgreSQL
/// text and JSONB cannot store NUL, and no field of this API has a use for it.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let json_type = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|m| {
                let m = m.trim().to_ascii_lowercase();
                m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
            })
            .unwrap_or(false);
        if !json_type {
            return Err(ApiError::BadRequest(
                "the body must be JSON with Content-Type: application/json".into(),
            ));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|r| {
                if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge(format!(
                        "the body is larger than {MAX_BODY_BYTES} bytes; send fewer lines per request"
                    ))
                } else {
                    ApiError::BadRequest(r.body_text())
                }
            })?;
        // Parsed as a tree first only to look at every string (keys too): cheap next to the
        // database round trips, and it covers fields added later without a check each. Malformed
        // JSON falls through to the typed parse, whose error says where.
        if let Ok(tree) = serde_json::from_slice::<Value>(&bytes) {
            if let Some(path) = nul_path(&tree, "$") {
                return Err(ApiError::Unprocessable(format!(
                    "{path} contains the NUL character (U+0000), which is not allowed; remove it"
                )));
            }
        }
        let Json(v) = Json::<T>::from_bytes(&bytes).map_err(json_rejection)?;
        Ok(Body(v))
    }
}

/// The JSON path of the first string (or key) in `v` that contains U+0000.
pub fn nul_path(v: &Value, at: &str) -> Option<String> {
    match v {
        Value::String(s) if s.contains('\0') => Some(at.to_string()),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, x)| nul_path(x, &format!("{at}[{i}]"))),
        Value::Object(m) => m.iter().find_map(|(k, x)| {
            if k.contains('\0') {
                Some(format!("a key of {at}"))
            } else {
                nul_path(x, &format!("{at}.{k}"))
            }
        }),
        _ => None,
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    let detail = r.body_text();
    match r.status() {
        StatusCode::UNPROCESSABLE_ENTITY => ApiError::Unprocessable(detail),
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(format!(
            "the body is larger than {MAX_BODY_BYTES} bytes; send fewer lines per request"
        )),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            ApiError::BadRequest("the body must be JSON with Content-Type: application/json".into())
        }
        _ => ApiError::BadRequest(detail),
    }
}

/// A UUID path parameter whose rejection is a problem document.
pub struct Id(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(s)) => Uuid::parse_str(&s)
                .map(Id)
                .map_err(|_| ApiError::BadRequest(format!("{s:?} is not a UUID"))),
            Err(r) => Err(path_rejection(r)),
        }
    }
}

fn path_rejection(r: PathRejection) -> ApiError {
    ApiError::BadRequest(r.body_text())
}

/// Query-string extractor whose rejections are problem documents.
pub struct Q<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| Q(v))
            .map_err(|r: QueryRejection| ApiError::BadRequest(r.body_text()))
    }
}

fn ctx(caller: &Caller, meta: &RequestMeta) -> Ctx {
    Ctx {
        tenant: caller.tenant.clone(),
        cause: Cause {
            actor: caller.user.clone(),
            user_id: Some(caller.user.clone()),
            correlation_id: meta.correlation_id.clone(),
            traceparent: meta.traceparent.clone(),
        },
    }
}

fn respond(status: StatusCode, body: Value) -> Response {
    if status.is_client_error() || status.is_server_error() {
        problem_response(status, body)
    } else {
        (status, Json(body)).into_response()
    }
}

/// Runs a state-changing command in one transaction, honouring the idempotency key: the key,
/// the effect, its events and the stored answer commit together or not at all.
async fn run_post(
    state: &AppState,
    caller: &Caller,
    meta: &RequestMeta,
    path: &str,
    request: Value,
    cmd: Command,
) -> ApiResult<Response> {
    let ctx = ctx(caller, meta);
    let mut tx = state.pool.begin().await?;
    if let Some(key) = &meta.idempotency_key {
        let fingerprint = json!({"method": "POST", "path": path, "body": request});
        match idempotency::claim(&mut tx, &caller.tenant, key, &fingerprint).await? {
            Claim::New => {}
            Claim::Replay(status, body) => {
                tx.rollback().await?;
                let mut resp = respond(status, body);
                resp.headers_mut().insert(
                    HeaderName::from_static(REPLAYED_HEADER),
                    HeaderValue::from_static("true"),
                );
                return Ok(resp);
            }
        }
    }
    let Outcome { status, body } = ops::execute(&mut tx, &state.outbox, &ctx, cmd).await?;
    if let Some(key) = &meta.idempotency_key {
        idempotency::store(&mut tx, &caller.tenant, key, status, &body).await?;
    }
    tx.commit().await?;
    state.notifier.committed();
    Ok(respond(status, body))
}

fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

#[utoipa::path(
    post,
    path = "/variants",
    tag = "variants",
    summary = "Create a variant (409 if the id exists)",
    params(("Idempotency-Key" = Option<String>, Header, description = "1-200 visible ASCII characters: a retry with the same key and request replays the first answer (Idempotent-Replayed: true) with no second effect; the key with another request answers 422")),
    request_body = CreateVariant,
    responses(
        (status = 201, description = "created", body = VariantView),
        (status = 400, description = "malformed request: JSON, id, query or header", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing, invalid or expired bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "conflicts with the current state", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "body over 1 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "well-formed but breaks a rule (or an Idempotency-Key reused for another request)", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "the service failed; the request had no effect", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the database is unavailable; the request had no effect, retry after Retry-After seconds", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn create_variant(
    State(s): State<AppState>,
    caller: Caller,
    axum::Extension(meta): axum::Extension<RequestMeta>,
    Body(b): Body<CreateVariant>,
) -> ApiResult<Response> {
    let req = to_value(&b);
    run_post(
        &s,
        &caller,
        &meta,
        "/variants",
        req,
        Command::CreateVariant(b),
    )
    .await
}

#[utoipa::path(
    put,
    path = "/variants/{id}",
    tag = "variants",
    summary = "Create (201) or update (200) a variant's low-stock threshold",
    params(("id" = Uuid, Path, description = "Variant id (UUID)")),
    request_body = UpsertVariant,
    responses(
        (status = 200, description = "updated", body = VariantView),
        (status = 201, description = "created", body = VariantView),
        (status = 400, description = "malformed request: JSON, id, query or header", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing, invalid or expired bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "body over 1 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "well-formed but breaks a rule (or an Idempotency-Key reused for another request)", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "the service failed; the request had no effect", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the database is unavailable; the request had no effect, retry after Retry-After seconds", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn put_variant(
    State(s): State<AppState>,
    caller: Caller,
    axum::Extension(meta): axum::Extension<RequestMeta>,
    Id(id): Id,
    Body(b): Body<UpsertVariant>,
) -> ApiResult<Response> {
    stock::check_threshold(b.low_stock_threshold)?;
    let ctx = ctx(&caller, &meta);
    let mut tx = s.pool.begin().await?;
    let Outcome { status, body } = ops::upsert_variant(&mut tx, &s.outbox, &ctx, id, b).await?;
    tx.commit().await?;
    s.notifier.committed();
    Ok(respond(status, body))
}

#[utoipa::path(
    get,
    path = "/variants/{id}",
    tag = "variants",
    summary = "Read a variant",
    params(("id" = Uuid, Path, description = "Variant id (UUID)")),
    responses(
        (status = 200, description = "the variant", body = VariantView),
        (status = 400, description = "malformed request: JSON, id, query or header", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing, invalid or expired bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such resource for this tenant", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "the service failed; the request had no effect", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the database is unavailable; the request had no effect, retry after Retry-After seconds", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn get_variant(
    State(s): State<AppState>,
    caller: Caller,
    Id(id): Id,
) -> ApiResult<Json<VariantView>> {
    let mut conn = s.pool.acquire().await?;
    let v = stock::get(&mut conn, &caller.tenant, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("variant {id} does not exist")))?;
    Ok(Json(v.view()))
}

/// Paging of list endpoints.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct Page {
    /// Most entries (1..=1000, default 100).
    pub limit: Option<i64>,
    /// Cursor: entries after this one (a variant id for `/variants`, a ledger entry id for a
    /// ledger).
    pub after: Option<String>,
}

fn limit(p: &Page) -> ApiResult<i64> {
    let l = p.limit.unwrap_or(100);
    if !(1..=1000).contains(&l) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and 1000, got {l}"
        )));
    }
    Ok(l)
}

#[utoipa::path(
    get,
    path = "/variants",
    tag = "variants",
    summary = "List variants by id",
    params(Page),
    responses(
        (status = 200, description = "a page of variants", body = VariantList),
        (status = 400, description = "malformed request: JSON, id, query or header", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing, invalid or expired bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "the service failed; the request had no effect", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the database is unavailable; the request had no effect, retry after Retry-After seconds", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn list_variants(
    State(s): State<AppState>,
    caller: Caller,
    Q(p): Q<Page>,
) -> ApiResult<Json<VariantList>> {
    let l = limit(&p)?;
    let after = match &p.after {
        None => Uuid::nil(),
        Some(a) => Uuid::parse_str(a)
            .map_err(|_| ApiError::BadRequest(format!("after {a:?} is not a UUID")))?,
    };
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM inv_variant WHERE tenant_id = $1 AND id > $2 ORDER BY id LIMIT $3",
    )
    .bind(&caller.tenant)
    .bind(after)
    .bind(l)
    .fetch_all(&s.pool)
    .await?;
    let mut conn = s.pool.acquire().await?;
    let mut items = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(v) = stock::get(&mut conn, &caller.tenant, id).await? {
            items.push(v.view());
        }
    }
    Ok(Json(VariantList { items }))
}

#[utoipa::path(
    post,
    path = "/variants/{id}/adjustments",
    tag = "variants",
    summary = "Manual stock change (signed quantity)",
    params(("id" = Uuid, Path, description = "Variant id (UUID)"), ("Idempotency-Key" = Option<String>, Header, description = "1-200 visible ASCII characters: a retry with the same key and request replays the first answer (Idempotent-Replayed: true) with no second effect; the key with another request answers 422")),
    request_body = Adjustment,
    responses(
        (status = 200, description = "the variant after the change", body = VariantView),
        (status = 400, description = "malformed request: JSON, id, query or header", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing, invalid or expired bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such resource for this tenant", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "not enough stock, or below the reserved stock", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "body over 1 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "well-formed but breaks a rule (or an Idempotency-Key reused for another request)", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "the service failed; the request had no effect", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the database is unavailable; the request had no effect, retry after Retry-After seconds", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn adjust(
    State(s): State<AppState>,
    caller: Caller,
    axum::Extension(meta): axum::Extension<RequestMeta>,
    Id(id): Id,
    Body(b): Body<Adjustment>,
) -> ApiResult<Response> {
    let req = to_value(&b);
    let path = format!("/variants/{id}/adjustments");
    run_post(&s, &caller, &meta, &path, req, Command::Adjust(id, b)).await
}

#[utoipa::path(
    post,
    path = "/variants/{id}/discontinue",
    tag = "variants",
    summary = "Discontinue a variant (a second call changes nothing)",
    params(("id" = Uuid, Path, description = "Variant id (UUID)"), ("Idempotency-Key" = Option<String>, Header, description = "1-200 visible ASCII characters: a retry with the same key and request replays the first answer (Idempotent-Replayed: true) with no second effect; the key with another request answers 422")),
    responses(
        (status = 200, description = "the variant, DISCONTINUED", body = VariantView),
        (status = 400, description = "malformed request: JSON, id, query or header", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing, invalid or expired bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such resource for this tenant", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "well-formed but breaks a rule (or an Idempotency-Key reused for another request)", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "the service failed; the request had no effect", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the database is unavailable; the request had no effect, retry after Retry-After seconds", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn discontinue(
    State(s): State<AppState>,
    caller: Caller,
    axum::Extension(meta): axum::Extension<RequestMeta>,
    Id(id): Id,
) -> ApiResult<Response> {
    let path = format!("/variants/{id}/discontinue");
    run_post(
        &s,
        &caller,
        &meta,
        &path,
        Value::Null,
        Command::Discontinue(id),
    )
    .await
}

#[utoipa::path(
    get,
    path = "/variants/{id}/ledger",
    tag = "variants",
    summary = "Stock movements of a variant, oldest first",
    params(("id" = Uuid, Path, description = "Variant id (UUID)"), Page),
    responses(
        (status = 200, description = "a page of the ledger", body = LedgerPage),
        (status = 400, description = "malformed request: JSON, id, query or header", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing, invalid or expired bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such resource for this tenant", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "the service failed; the request had no effect", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the database is unavailable; the request had no effect, retry after Retry-After seconds", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn ledger(
    State(s): State<AppState>,
    caller: Caller,
    Id(id): Id,
    Q(p): Q<Page>,
) -> ApiResult<Json<LedgerPage>> {
    let l = limit(&p)?;
    let after = match &p.after {
        None => 0,
        Some(a) => a
            .parse::<i64>()
            .map_err(|_| ApiError::BadRequest(format!("after {a:?} is not a ledger entry id")))?,
    };
    let mut conn = s.pool.acquire().await?;
    if stock::get(&mut conn, &caller.tenant, id).await?.is_none() {
        return Err(ApiError::NotFound(format!("variant {id} does not exist")));
    }
    let entries = ops::ledger(&mut conn, &caller.tenant, id, after, l).await?;
    Ok(Json(LedgerPage {
        product_variant_id: id,
        entries,
    }))
}

#[utoipa::path(
    post,
    path = "/receipts",
    tag = "receipts",
    summary = "Create a draft goods receipt",
    params(("Idempotency-Key" = Option<String>, Header, description = "1-200 visible ASCII characters: a retry with the same key and request replays the first answer (Idempotent-Replayed: true) with no second effect; the key with another request answers 422")),
    request_body = CreateReceipt,
    responses(
        (status = 201, description = "created", body = ReceiptView),
        (status = 400, description = "malformed request: JSON, id, query or header", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing, invalid or expired bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "body over 1 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "well-formed but breaks a rule (or an Idempotency-Key reused for another request)", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "the service failed; the request had no effect", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the database is unavailable; the request had no effect, retry after Retry-After seconds", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn create_receipt(
    State(s): State<AppState>,
    caller: Caller,
    axum::Extension(meta): axum::Extension<RequestMeta>,
    Body(b): Body<CreateReceipt>,
) -> ApiResult<Response> {
    let req = to_value(&b);
    run_post(
        &s,
        &caller,
        &meta,
        "/receipts",
        req,
        Command::CreateReceipt(b),
    )
    .await
}

#[utoipa::path(
    get,
    path = "/receipts/{id}",
    tag = "receipts",
    summary = "Read a receipt",
    params(("id" = Uuid, Path, description = "Receipt id (UUID)")),
    responses(
        (status = 200, description = "the receipt", body = ReceiptView),
        (status = 400, description = "malformed request: JSON, id, query or header", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing, invalid or expired bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such resource for this tenant", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "the service failed; the request had no effect", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the database is unavailable; the request had no effect, retry after Retry-After seconds", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn get_receipt(
    State(s): State<AppState>,
    caller: Caller,
    Id(id): Id,
) -> ApiResult<Json<ReceiptView>> {
    let mut conn = s.pool.acquire().await?;
    ops::get_receipt(&mut conn, &caller.tenant, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("receipt {id} does not exist")))
}

#[utoipa::path(
    post,
    path = "/receipts/{id}/validate",
    tag = "receipts",
    summary = "Validate a receipt: stock rises (PURCHASE) once",
    params(("id" = Uuid, Path, description = "Receipt id (UUID)"), ("Idempotency-Key" = Option<String>, Header, description = "1-200 visible ASCII characters: a retry with the same key and request replays the first answer (Idempotent-Replayed: true) with no second effect; the key with another request answers 422")),
    responses(
        (status = 200, description = "the validated receipt", body = ReceiptView),
        (status = 400, description = "malformed request: JSON, id, query or header", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing, invalid or expired bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such resource for this tenant", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "already validated, or a quantity over the limit", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "well-formed but breaks a rule (or an Idempotency-Key reused for another request)", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "the service failed; the request had no effect", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the database is unavailable; the request had no effect, retry after Retry-After seconds", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn validate_receipt(
    State(s): State<AppState>,
    caller: Caller,
    axum::Extension(meta): axum::Extension<RequestMeta>,
    Id(id): Id,
) -> ApiResult<Response> {
    let path = format!("/receipts/{id}/validate");
    run_post(
        &s,
        &caller,
        &meta,
        &path,
        Value::Null,
        Command::ValidateReceipt(id),
    )
    .await
}

#[utoipa::path(
    post,
    path = "/reservations",
    tag = "reservations",
    summary = "Reserve all lines or none",
    params(("Idempotency-Key" = Option<String>, Header, description = "1-200 visible ASCII characters: a retry with the same key and request replays the first answer (Idempotent-Replayed: true) with no second effect; the key with another request answers 422")),
    request_body = CreateReservation,
    responses(
        (status = 201, description = "reserved", body = ReservationView),
        (status = 400, description = "malformed request: JSON, id, query or header", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing, invalid or expired bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "some lines cannot be reserved: `failures` lists them, nothing was reserved, their InventoryReservationFailedEvents are committed", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "body over 1 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "well-formed but breaks a rule (or an Idempotency-Key reused for another request)", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "the service failed; the request had no effect", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the database is unavailable; the request had no effect, retry after Retry-After seconds", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn reserve(
    State(s): State<AppState>,
    caller: Caller,
    axum::Extension(meta): axum::Extension<RequestMeta>,
    Body(b): Body<CreateReservation>,
) -> ApiResult<Response> {
    let req = to_value(&b);
    run_post(
        &s,
        &caller,
        &meta,
        "/reservations",
        req,
        Command::Reserve(b),
    )
    .await
}

#[utoipa::path(
    get,
    path = "/reservations/{id}",
    tag = "reservations",
    summary = "Read a reservation",
    params(("id" = Uuid, Path, description = "Reservation id (UUID)")),
    responses(
        (status = 200, description = "the reservation", body = ReservationView),
        (status = 400, description = "malformed request: JSON, id, query or header", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing, invalid or expired bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such resource for this tenant", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "the service failed; the request had no effect", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the database is unavailable; the request had no effect, retry after Retry-After seconds", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn get_reservation(
    State(s): State<AppState>,
    caller: Caller,
    Id(id): Id,
) -> ApiResult<Json<ReservationView>> {
    let mut conn = s.pool.acquire().await?;
    ops::get_reservation(&mut conn, &caller.tenant, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("reservation {id} does not exist")))
}

#[utoipa::path(
    post,
    path = "/reservations/{id}/cancel",
    tag = "reservations",
    summary = "Release an active reservation (ORDER_CANCELLED)",
    params(("id" = Uuid, Path, description = "Reservation id (UUID)"), ("Idempotency-Key" = Option<String>, Header, description = "1-200 visible ASCII characters: a retry with the same key and request replays the first answer (Idempotent-Replayed: true) with no second effect; the key with another request answers 422")),
    responses(
        (status = 200, description = "the released reservation", body = ReservationView),
        (status = 400, description = "malformed request: JSON, id, query or header", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing, invalid or expired bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such resource for this tenant", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the reservation is not ACTIVE", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "well-formed but breaks a rule (or an Idempotency-Key reused for another request)", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "the service failed; the request had no effect", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the database is unavailable; the request had no effect, retry after Retry-After seconds", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn cancel(
    State(s): State<AppState>,
    caller: Caller,
    axum::Extension(meta): axum::Extension<RequestMeta>,
    Id(id): Id,
) -> ApiResult<Response> {
    let path = format!("/reservations/{id}/cancel");
    run_post(&s, &caller, &meta, &path, Value::Null, Command::Cancel(id)).await
}

#[utoipa::path(
    post,
    path = "/reservations/{id}/ship",
    tag = "reservations",
    summary = "Ship an active reservation: reserved stock leaves (SALE)",
    params(("id" = Uuid, Path, description = "Reservation id (UUID)"), ("Idempotency-Key" = Option<String>, Header, description = "1-200 visible ASCII characters: a retry with the same key and request replays the first answer (Idempotent-Replayed: true) with no second effect; the key with another request answers 422")),
    responses(
        (status = 200, description = "the shipped reservation", body = ReservationView),
        (status = 400, description = "malformed request: JSON, id, query or header", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing, invalid or expired bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such resource for this tenant", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the reservation is not ACTIVE, or has expired", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "well-formed but breaks a rule (or an Idempotency-Key reused for another request)", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "the service failed; the request had no effect", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the database is unavailable; the request had no effect, retry after Retry-After seconds", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn ship(
    State(s): State<AppState>,
    caller: Caller,
    axum::Extension(meta): axum::Extension<RequestMeta>,
    Id(id): Id,
) -> ApiResult<Response> {
    let path = format!("/reservations/{id}/ship");
    run_post(&s, &caller, &meta, &path, Value::Null, Command::Ship(id)).await
}

/// Why the health endpoints answer 503 once the in-process relay stopped (crate::supervise):
/// the process is about to exit non-zero, and events committed now would not be delivered.
fn relay_stopped() -> Response {
    ApiError::Unavailable("the in-process relay stopped; events are not delivered".into())
        .into_response()
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    summary = "Liveness",
    responses(
        (status = 200, description = "alive", body = Health),
        (status = 400, description = "malformed request: JSON, id, query or header", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the in-process relay stopped; the service is about to exit", body = Problem, content_type = "application/problem+json")
    ),
    security(())
)]
pub(crate) async fn healthz(State(s): State<AppState>) -> Response {
    if s.relay.failed() {
        return relay_stopped();
    }
    Json(Health {
        status: "ok".into(),
    })
    .into_response()
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    summary = "Readiness: the database answers",
    responses(
        (status = 200, description = "ready", body = Health),
        (status = 400, description = "malformed request: JSON, id, query or header", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the database is unavailable (retry after Retry-After seconds), or the in-process relay stopped", body = Problem, content_type = "application/problem+json")
    ),
    security(())
)]
pub(crate) async fn readyz(State(s): State<AppState>) -> Response {
    if s.relay.failed() {
        return relay_stopped();
    }
    match sqlx::query("SELECT 1").execute(&s.pool).await {
        Ok(_) => Json(Health {
            status: "ready".into(),
        })
        .into_response(),
        Err(e) => ApiError::Unavailable(e.to_string()).into_response(),
    }
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    summary = "This document (OpenAPI 3.1)",
    responses(
        (status = 200, description = "the document", body = Value),
        (status = 400, description = "malformed request: JSON, id, query or header", body = Problem, content_type = "application/problem+json")
    ),
    security(())
)]
pub(crate) async fn openapi() -> Json<Value> {
    Json(crate::openapi::document())
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> Response {
    problem_response(
        StatusCode::METHOD_NOT_ALLOWED,
        crate::error::problem(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{method} is not allowed on {}", uri.path()),
        ),
    )
}

/// The service's router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/variants", post(create_variant).get(list_variants))
        .route("/variants/{id}", get(get_variant).put(put_variant))
        .route("/variants/{id}/adjustments", post(adjust))
        .route("/variants/{id}/discontinue", post(discontinue))
        .route("/variants/{id}/ledger", get(ledger))
        .route("/receipts", post(create_receipt))
        .route("/receipts/{id}", get(get_receipt))
        .route("/receipts/{id}/validate", post(validate_receipt))
        .route("/reservations", post(reserve))
        .route("/reservations/{id}", get(get_reservation))
        .route("/reservations/{id}/cancel", post(cancel))
        .route("/reservations/{id}/ship", post(ship))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(correlation))
        .with_state(state)
}
