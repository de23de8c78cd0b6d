//! The notifications service.
