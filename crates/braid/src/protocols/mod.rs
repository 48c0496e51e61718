//! Ready-made protocols.

pub mod echo;
