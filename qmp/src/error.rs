//! QMP error replies.

use std::fmt;

/// QEMU's `QapiErrorClass`. QSD only ever sends `GenericError` and
/// `CommandNotFound` for the commands blkd implements; the others exist for
/// completeness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KVMMissingCap,
}

impl ErrorClass {
    /// The name QMP puts in `"class"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error reply: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`, the class of nearly every QEMU error.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// `The command <name> has not been found` (`CommandNotFound`).
    pub fn command_not_found(name: &str) -> Self {
        Self::new(
            ErrorClass::CommandNotFound,
            format!("The command {name} has not been found"),
        )
    }
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.desc)
    }
}

impl std::error::Error for QmpError {}

impl From<String> for QmpError {
    fn from(desc: String) -> Self {
        QmpError::generic(desc)
    }
}

impl From<&str> for QmpError {
    fn from(desc: &str) -> Self {
        QmpError::generic(desc)
    }
}
