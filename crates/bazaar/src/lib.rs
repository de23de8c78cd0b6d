//! The library half of the `bazaar` binary: the role table and the roles' settings, and the
//! load driver, shared by the binary's commands, its end-to-end tests and the benches.

pub mod contracts;
pub mod load;
pub mod roles;
