//! Ready-made protocols, and the building blocks that wrap your own:
//! line receivers ([`line`](mod@line), [`line_only`]), netstrings ([`netstring`])
//! and length-prefixed strings ([`prefixed`]), a file sender
//! ([`file_sender`]), Twisted's `twisted.protocols.basic`; and the small RFC
//! services of `twisted.protocols.wire` ([`wire`], [`echo`]).
//!
//! Each receiver keeps its parser (a `*Decoder`: push bytes, pull
//! messages, no I/O) apart from the [`Protocol`](crate::Protocol) that
//! feeds it, so the parsers can be property-tested and fuzzed on their
//! own. The machinery they share (pausing, re-entrancy, handles) is in
//! [`receiver`].

pub mod delimiter;
pub mod echo;
pub mod file_sender;
pub mod http;
pub mod line;
pub mod line_only;
pub mod netstring;
pub mod prefixed;
pub mod receiver;
pub mod strings;
pub mod wire;
