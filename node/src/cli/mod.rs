//! The command files of the `nomoat` binary: each parses its flags, calls
//! the library and prints. No node is assembled here ([`nomoat_node::node`]
//! does that).

pub(crate) mod access;
pub(crate) mod bench;
pub(crate) mod config;
pub(crate) mod demo;
pub(crate) mod gateway;
pub(crate) mod generate;
pub(crate) mod serve;
pub(crate) mod status;
pub(crate) mod weights;
