//! Response bodies: whole buffers for ordinary answers, a channel for watch streams (so the
//! stream's pacing, hangs and aborts stay under the stand-in's control).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Frame;
use hyper::{header, Response, StatusCode};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::status::ApiError;

pub type Body = BoxBody<Bytes, std::io::Error>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A body fed by a channel; an `Err` item aborts the connection.
struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.rx.poll_recv(cx).map(|item| item.map(|r| r.map(Frame::data)))
    }
}

pub fn channel(rx: mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Body {
    BoxBody::new(ChannelBody { rx })
}

fn base(status: u16) -> hyper::http::response::Builder {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CACHE_CONTROL, "no-cache, private")
}

pub fn json(status: u16, v: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    base(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(bytes))
        .expect("static response parts are valid")
}

pub fn text(status: u16, s: impl Into<String>) -> Response<Body> {
    base(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header("X-Content-Type-Options", "nosniff")
        .body(full(s.into()))
        .expect("static response parts are valid")
}

pub fn error(e: &ApiError) -> Response<Body> {
    let mut r = json(e.code, &e.to_status());
    if let Some(secs) = e.details.as_ref().and_then(|d| d.get("retryAfterSeconds")).and_then(Value::as_u64) {
        r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
    }
    r
}

/// A streaming JSON response (watch).
pub fn stream(rx: mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Response<Body> {
    base(200)
        .header(header::CONTENT_TYPE, "application/json")
        .body(channel(rx))
        .expect("static response parts are valid")
}
