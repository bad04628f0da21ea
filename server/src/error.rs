//! The one table from error kind to HTTP status and JSON `type`. Client-facing
//! messages are written here or in the request path; internal details only go to logs.

use http::StatusCode;
use kiln_batcher::BatchError;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidRequest,
    RequestTimeout,
    Unauthorized,
    Forbidden,
    LoadFailed,
    NotFound,
    MethodNotAllowed,
    UnsupportedMediaType,
    InvalidMultipart,
    MissingField,
    EmptyFile,
    InvalidImage,
    TooManyFiles,
    PayloadTooLarge,
    ModelNotFound,
    InvalidParameter,
    Timeout,
    Overloaded,
    Unavailable,
    Internal,
}

impl ErrorKind {
    /// Every kind, for documents and tests that must cover them all.
    pub const ALL: [ErrorKind; 20] = [
        ErrorKind::InvalidRequest,
        ErrorKind::RequestTimeout,
        ErrorKind::Unauthorized,
        ErrorKind::Forbidden,
        ErrorKind::LoadFailed,
        ErrorKind::NotFound,
        ErrorKind::MethodNotAllowed,
        ErrorKind::UnsupportedMediaType,
        ErrorKind::InvalidMultipart,
        ErrorKind::MissingField,
        ErrorKind::EmptyFile,
        ErrorKind::InvalidImage,
        ErrorKind::TooManyFiles,
        ErrorKind::PayloadTooLarge,
        ErrorKind::ModelNotFound,
        ErrorKind::InvalidParameter,
        ErrorKind::Timeout,
        ErrorKind::Overloaded,
        ErrorKind::Unavailable,
        ErrorKind::Internal,
    ];

    pub fn status(self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::InvalidRequest => StatusCode::BAD_REQUEST,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::LoadFailed => StatusCode::BAD_REQUEST,
            Self::NotFound | Self::ModelNotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::InvalidMultipart
            | Self::MissingField
            | Self::EmptyFile
            | Self::TooManyFiles
            | Self::InvalidParameter => StatusCode::BAD_REQUEST,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::InvalidImage => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn type_name(self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::InvalidRequest => "invalid_request",
            Self::RequestTimeout => "request_timeout",
            Self::Forbidden => "forbidden",
            Self::LoadFailed => "load_failed",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::InvalidMultipart => "invalid_multipart",
            Self::MissingField => "missing_field",
            Self::EmptyFile => "empty_file",
            Self::InvalidImage => "invalid_image",
            Self::TooManyFiles => "too_many_files",
            Self::PayloadTooLarge => "payload_too_large",
            Self::ModelNotFound => "model_not_found",
            Self::InvalidParameter => "invalid_parameter",
            Self::Timeout => "timeout",
            Self::Overloaded => "overloaded",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// For 405: the methods the resource does accept (sent as `Allow`, which RFC 9110 requires).
    pub allow: Option<&'static str>,
}

#[derive(Serialize)]
pub struct ErrorBody<'a> {
    pub error: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), allow: None }
    }

    /// 405 for `method` on a resource that accepts only `allow`.
    pub fn method_not_allowed(method: &http::Method, allow: &'static str) -> Self {
        Self { allow: Some(allow), ..Self::new(ErrorKind::MethodNotAllowed, format!("{method} is not allowed here")) }
    }

    /// An internal failure: logs the detail, tells the client only that it happened.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
        Self::new(ErrorKind::Internal, "internal server error")
    }
}

impl From<BatchError> for ApiError {
    fn from(e: BatchError) -> Self {
        match e {
            BatchError::QueueFull(_) => Self::new(ErrorKind::Overloaded, "the model's queue is full; retry later"),
            BatchError::ShuttingDown => Self::new(ErrorKind::Unavailable, "the server is shutting down"),
            BatchError::BadItemCount { items, .. } => {
                Self::new(ErrorKind::TooManyFiles, format!("{items} items cannot be batched by this model"))
            }
            BatchError::BadPriority { given, levels } => {
                Self::new(ErrorKind::InvalidParameter, format!("priority {given} is outside 1..={levels}"))
            }
            BatchError::Timeout => {
                Self::new(ErrorKind::Timeout, "the request's timeout passed before it could be executed")
            }
            other => Self::internal(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_maps_to_an_error_status() {
        for kind in ErrorKind::ALL {
            let status = kind.status();
            assert!(status.is_client_error() || status.is_server_error(), "{kind:?}");
            assert!(!kind.type_name().is_empty());
        }
        assert_eq!(ErrorKind::Internal.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn internal_errors_hide_details() {
        let e = ApiError::from(BatchError::Execution("/secret/path exploded".into()));
        assert_eq!(e.kind, ErrorKind::Internal);
        assert!(!e.message.contains("secret"));
    }
}
