//! `bazaar-bench`'s library half: the harness that runs `bazaar up` as a child process, shared
//! by the saga bench and the `bazaar` crate's end-to-end tests, so both start, probe and stop
//! the system the same way.

pub mod harness;
