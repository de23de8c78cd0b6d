//! The users service.
