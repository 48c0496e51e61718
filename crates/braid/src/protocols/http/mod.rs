//! An HTTP/1.1 server: a connection protocol ([`HttpChannel`], built by
//! the [`Site`] factory) that answers requests with [`Resource`]s, such as
//! the static files of a directory ([`StaticFiles`]) or handlers of your
//! own mounted on a [`Router`] (Twisted's `twisted.web.server`).
//!
//! Requests are tokenized by `httparse`; everything else is here, each
//! piece on its own: the request decoder ([`request`], no I/O, fuzzed),
//! target-to-file resolution that cannot leave the served directory
//! ([`path`]), response heads ([`response`]), body sending as a pull
//! producer ([`body`]), ranges ([`range`]), dates ([`date`]), listings
//! ([`listing`]) and the access log ([`log`]).

pub mod body;
pub mod channel;
pub mod date;
pub mod listing;
pub mod log;
pub mod path;
pub mod range;
pub mod request;
pub mod resource;
pub mod response;
pub mod static_files;

pub use channel::{Config, HttpChannel, Site};
pub use request::Limits;
pub use resource::{Request, Resource, Router};
pub use response::{Body, BodyStream, Response};
pub use static_files::StaticFiles;
