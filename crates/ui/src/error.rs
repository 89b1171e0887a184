//! Errors of the API: a status, a message for the user, and the config key
//! it is about (so the page can show it next to that field).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answered as `{"error": message, "key": key, "field": field}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The config key the message is about (`dataset.subsets[0].path`).
    pub key: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            key: None,
        }
    }
    /// 400: the request's values are wrong.
    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    /// 403: not allowed (outside the roots, a foreign origin).
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }
    /// 409: a run is already going.
    pub fn busy(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
    /// 500: something on this machine failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
    /// The same error, about config key `key`.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
}

/// The form field a config key belongs to: the table and the key in it,
/// without array indexes or deeper parts (`dataset.subsets[0].path` →
/// `dataset.subsets`).
pub fn field_of(key: &str) -> String {
    let mut parts = key.split('.');
    let table = parts.next().unwrap_or_default();
    match parts.next() {
        Some(k) => format!("{table}.{}", k.split('[').next().unwrap_or(k)),
        None => table.to_string(),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let field = self.key.as_deref().map(field_of);
        let body = json!({"error": self.message, "key": self.key, "field": field});
        (self.status, Json(body)).into_response()
    }
}

/// Any API path that does not exist.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such page or API endpoint")
}

/// A JSON body whose rejection (not JSON, wrong fields, too large) is
/// answered like every other error: JSON with a message.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(r) => Err(ApiError::new(
                r.status(),
                format!("the request was refused: {}", r.body_text()),
            )),
        }
    }
}

/// Query parameters whose rejection is answered as JSON too.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequestParts<S>
    for ApiQuery<T>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(r) => Err(ApiError::new(
                r.status(),
                format!("the request was refused: {}", r.body_text()),
            )),
        }
    }
}
