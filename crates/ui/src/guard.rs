//! Request checks that run before every handler:
//!
//! - **Host** (DNS rebinding): on a loopback address the `Host` header must
//!   name loopback (`localhost`, `127.0.0.1`, `[::1]`) with the app's port, so
//!   a page of another site whose name was re-pointed at 127.0.0.1 cannot
//!   read the app. On another address the token guards every request.
//! - **Token**: when one is set, every request must carry it — the
//!   `sd_lora_token` cookie (set when the page is opened with `?token=`), an
//!   `Authorization: Bearer` header, or `?token=` — else 401.
//! - **State-changing requests** (anything but GET/HEAD): an `Origin`, when
//!   sent, must be the app's own; `Sec-Fetch-Site`, when sent, must be
//!   same-origin; and the body must be JSON, which a cross-site form cannot
//!   send without a CORS preflight this app never answers — so no CSRF.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;

use crate::Shared;
use crate::error::ApiError;

/// Name of the cookie that carries the token.
pub const TOKEN_COOKIE: &str = "sd_lora_token";

/// What requests are checked against.
#[derive(Debug, Clone)]
pub struct Guard {
    addr: SocketAddr,
    token: Option<String>,
}

impl Guard {
    /// Checks for an app bound at `addr`, with `token` if one is needed.
    pub fn new(addr: SocketAddr, token: Option<String>) -> Self {
        Guard { addr, token }
    }

    /// The URL to open (with the token when there is one).
    pub fn url(&self) -> String {
        let host = if self.addr.ip().is_loopback() || self.addr.ip().is_unspecified() {
            format!("127.0.0.1:{}", self.addr.port())
        } else {
            self.addr.to_string()
        };
        match &self.token {
            Some(t) => format!("http://{host}/?token={t}"),
            None => format!("http://{host}/"),
        }
    }

    /// Whether `host` (a `Host` header) names this app.
    fn host_allowed(&self, host: &str) -> bool {
        if !self.addr.ip().is_loopback() {
            // Any name may reach a LAN address; the token guards it.
            return true;
        }
        let port = self.addr.port().to_string();
        let Some((name, p)) = host.rsplit_once(':') else {
            return false;
        };
        p == port && matches!(name, "localhost" | "127.0.0.1" | "[::1]")
    }

    /// The token the request carries, if any.
    fn presented<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Vec<&'a str> {
        let mut out = Vec::new();
        for v in headers.get_all(header::COOKIE) {
            if let Ok(s) = v.to_str() {
                for part in s.split(';') {
                    if let Some(t) = part
                        .trim()
                        .strip_prefix(TOKEN_COOKIE)
                        .and_then(|r| r.strip_prefix('='))
                    {
                        out.push(t);
                    }
                }
            }
        }
        if let Some(t) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        {
            out.push(t.trim());
        }
        if let Some(q) = query {
            for pair in q.split('&') {
                if let Some(t) = pair.strip_prefix("token=") {
                    out.push(t);
                }
            }
        }
        out
    }

    /// Checks one request; `Err` is the refusal to send.
    pub fn check(
        &self,
        method: &Method,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<(), ApiError> {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !self.host_allowed(host) {
            return Err(ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "this app answers only to http://127.0.0.1:{}/ (the request named host {host:?})",
                    self.addr.port()
                ),
            ));
        }
        if let Some(token) = &self.token
            && !Self::presented(headers, query)
                .iter()
                .any(|t| constant_time_eq(t.as_bytes(), token.as_bytes()))
        {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "this sd-lora ui needs its token: open the URL it printed (…/?token=…)",
            ));
        }
        if method != Method::GET && method != Method::HEAD {
            if let Some(origin) = headers.get(header::ORIGIN) {
                let ok = origin
                    .to_str()
                    .ok()
                    .and_then(|o| o.strip_prefix("http://"))
                    .is_some_and(|o| o == host);
                if !ok {
                    return Err(ApiError::forbidden(
                        "refused: the request came from another site (Origin does not match)",
                    ));
                }
            }
            if let Some(site) = headers.get("sec-fetch-site")
                && !matches!(site.to_str(), Ok("same-origin") | Ok("none"))
            {
                return Err(ApiError::forbidden(
                    "refused: the request came from another site (Sec-Fetch-Site)",
                ));
            }
            let json = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/json"));
            if !json {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "requests that change something must send JSON (Content-Type: application/json)",
                ));
            }
        }
        Ok(())
    }

    /// Whether `query` carries the right token (the page then gets the cookie).
    fn query_has_token(&self, query: Option<&str>) -> Option<&str> {
        let token = self.token.as_deref()?;
        query?
            .split('&')
            .filter_map(|p| p.strip_prefix("token="))
            .any(|t| constant_time_eq(t.as_bytes(), token.as_bytes()))
            .then_some(token)
    }
}

/// Compares without an early exit, so the time taken says nothing about how
/// much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The middleware: refuses what [`Guard::check`] refuses; gives the page the
/// token cookie when it was opened with `?token=`.
pub async fn check_request(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let query = req.uri().query().map(str::to_string);
    if let Err(e) = state
        .guard
        .check(req.method(), req.headers(), query.as_deref())
    {
        return e.into_response();
    }
    let cookie = state
        .guard
        .query_has_token(query.as_deref())
        .map(str::to_string);
    let mut resp = next.run(req).await;
    if let Some(t) = cookie
        && let Ok(v) = HeaderValue::from_str(&format!(
            "{TOKEN_COOKIE}={t}; HttpOnly; SameSite=Strict; Path=/"
        ))
    {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    /// On loopback only loopback host names with the right port pass.
    #[test]
    fn host_names_are_checked_on_loopback() {
        let g = Guard::new("127.0.0.1:7860".parse().unwrap(), None);
        for ok in ["127.0.0.1:7860", "localhost:7860", "[::1]:7860"] {
            assert!(
                g.check(&Method::GET, &headers(&[("host", ok)]), None)
                    .is_ok(),
                "{ok}"
            );
        }
        for bad in ["evil.example:7860", "127.0.0.1:80", "127.0.0.1", ""] {
            let e = g
                .check(&Method::GET, &headers(&[("host", bad)]), None)
                .unwrap_err();
            assert_eq!(e.status, StatusCode::MISDIRECTED_REQUEST, "{bad}");
        }
    }

    /// A token set: cookie, bearer header or query pass; nothing or a wrong one is 401.
    #[test]
    fn token_is_required_when_set() {
        let g = Guard::new("0.0.0.0:7860".parse().unwrap(), Some("abcdef123456".into()));
        let h = |extra: &[(&str, &str)]| {
            let mut v = vec![("host", "192.168.1.5:7860")];
            v.extend_from_slice(extra);
            headers(&v)
        };
        assert!(
            g.check(
                &Method::GET,
                &h(&[("cookie", "a=b; sd_lora_token=abcdef123456")]),
                None
            )
            .is_ok()
        );
        assert!(
            g.check(
                &Method::GET,
                &h(&[("authorization", "Bearer abcdef123456")]),
                None
            )
            .is_ok()
        );
        assert!(
            g.check(&Method::GET, &h(&[]), Some("token=abcdef123456"))
                .is_ok()
        );
        for (extra, q) in [
            (vec![], None),
            (vec![("cookie", "sd_lora_token=abcdef123457")], None),
            (vec![], Some("token=x")),
        ] {
            let e = g.check(&Method::GET, &h(&extra), q).unwrap_err();
            assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        }
    }

    /// POSTs need JSON and, when sent, their own Origin and Sec-Fetch-Site.
    #[test]
    fn state_changes_check_origin_and_type() {
        let g = Guard::new("127.0.0.1:7860".parse().unwrap(), None);
        let base = [
            ("host", "127.0.0.1:7860"),
            ("content-type", "application/json"),
        ];
        let with = |extra: &[(&str, &str)]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            headers(&v)
        };
        assert!(
            g.check(
                &Method::POST,
                &with(&[("origin", "http://127.0.0.1:7860")]),
                None
            )
            .is_ok()
        );
        assert!(g.check(&Method::POST, &with(&[]), None).is_ok());
        let e = g
            .check(
                &Method::POST,
                &with(&[("origin", "http://evil.example")]),
                None,
            )
            .unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        let e = g
            .check(
                &Method::POST,
                &with(&[("sec-fetch-site", "cross-site")]),
                None,
            )
            .unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        let form = headers(&[
            ("host", "127.0.0.1:7860"),
            ("content-type", "application/x-www-form-urlencoded"),
        ]);
        let e = g.check(&Method::POST, &form, None).unwrap_err();
        assert_eq!(e.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
}
