//! The gateway's own answers: one enum of facts, one exhaustive match to a status code
//! and a short plain-text body.

use hyper::StatusCode;

use super::client::SendError;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("request target longer than {0} bytes")]
    UriTooLong(usize),
    #[error("request head over max_header_bytes or 100 fields")]
    HeadTooLarge,
    #[error("HTTP version not supported")]
    VersionNotSupported,
    #[error("the client stopped sending its request body")]
    BodyTimeout,
    #[error("a request body in a transfer coding other than chunked")]
    UnsupportedCoding,
    #[error("no route for this host and path")]
    NoRoute,
    #[error("the TLS server name and the Host header disagree")]
    Misdirected,
    #[error("method not allowed: {0}")]
    MethodNotAllowed(&'static str),
    #[error("no server available in upstream {0}")]
    NoServer(String),
    #[error(transparent)]
    Upstream(#[from] SendError),
    #[error("upstream refused the upgrade")]
    UpgradeFailed,
    #[error("every attempt in upstream {upstream} failed; last: {last}")]
    Exhausted { upstream: String, last: SendError },
    #[error("the client went away while it sent its request body")]
    ClientClosed,
}

impl ProxyError {
    /// The server that failed (the last one tried), for the access log.
    pub fn server(&self) -> Option<std::net::SocketAddr> {
        match self {
            ProxyError::Upstream(e) | ProxyError::Exhausted { last: e, .. } => e.server(),
            _ => None,
        }
    }

    /// The bytes of its answer's body, for the access log (none reach a client that left).
    pub fn body_bytes(&self) -> u64 {
        match self {
            ProxyError::ClientClosed => 0,
            _ => self.body().len() as u64,
        }
    }

    /// The status the access log and the metrics give it: what was sent, or nginx's 499
    /// for a client that went away before its answer.
    pub fn logged_status(&self) -> u16 {
        match self {
            ProxyError::ClientClosed => 499,
            _ => self.status().as_u16(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            // ClientClosed: a 400 to a client that is most likely gone (logged as 499).
            ProxyError::BadRequest(_) | ProxyError::ClientClosed => StatusCode::BAD_REQUEST,
            ProxyError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ProxyError::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::VersionNotSupported => StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            ProxyError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::UnsupportedCoding => StatusCode::NOT_IMPLEMENTED,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::Misdirected => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::NoServer(_) => StatusCode::SERVICE_UNAVAILABLE,
            // Out of descriptors or ports here: the gateway's overload, not a server's fault.
            ProxyError::Upstream(e) | ProxyError::Exhausted { last: e, .. } if e.is_local_shortage() => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Upstream(SendError::ResponseTimeout { .. }) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Upstream(_) | ProxyError::UpgradeFailed | ProxyError::Exhausted { .. } => {
                StatusCode::BAD_GATEWAY
            }
        }
    }

    /// The body sent to the client: short, stable, and free of internal addresses.
    pub fn body(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) | ProxyError::ClientClosed => "400 bad request\n",
            ProxyError::UriTooLong(_) => "414 request target too long\n",
            ProxyError::HeadTooLarge => "431 request head too large\n",
            ProxyError::VersionNotSupported => "505 HTTP version not supported\n",
            ProxyError::BodyTimeout => "408 request body timed out\n",
            ProxyError::UnsupportedCoding => "501 transfer coding not supported\n",
            ProxyError::NoRoute => "404 no route for this host and path\n",
            ProxyError::Misdirected => "421 misdirected request: TLS server name and Host differ\n",
            ProxyError::MethodNotAllowed(_) => "405 method not allowed\n",
            ProxyError::NoServer(_) => "503 no server available\n",
            ProxyError::Upstream(SendError::ResponseTimeout { .. }) => "504 upstream timed out\n",
            ProxyError::Upstream(e) | ProxyError::Exhausted { last: e, .. } if e.is_local_shortage() => {
                "503 gateway overloaded\n"
            }
            ProxyError::Upstream(_) | ProxyError::Exhausted { .. } => "502 upstream failed\n",
            ProxyError::UpgradeFailed => "502 upstream upgrade failed\n",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_failing_for_want_of_descriptors_is_the_gateway_s_overload() {
        let addr = std::net::SocketAddr::from(([10, 0, 0, 1], 80));
        let connect = |errno: i32| SendError::Connect { addr, source: std::io::Error::from_raw_os_error(errno) };
        // EMFILE, ENFILE: 503 and not the server's failure (no ejection).
        for errno in [24, 23] {
            let e = ProxyError::Upstream(connect(errno));
            assert_eq!((e.status(), e.body()), (StatusCode::SERVICE_UNAVAILABLE, "503 gateway overloaded\n"));
            assert!(!connect(errno).is_server_failure());
        }
        // ECONNREFUSED: the server's.
        let e = ProxyError::Upstream(connect(111));
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        assert!(connect(111).is_server_failure());
    }
}
