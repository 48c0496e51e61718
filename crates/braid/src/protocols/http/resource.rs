//! Resources: what answers a request (Twisted's `Resource`), and a router
//! that mounts them at paths.

use std::rc::Rc;

use super::path::RequestPath;
use super::request::RequestHead;
use super::response::Response;
use crate::stream::Address;

/// A request as a resource sees it: the head, the decoded path, and where
/// the resource is mounted.
pub struct Request<'a> {
    /// The head as received.
    pub head: &'a RequestHead,
    /// The target's decoded path.
    pub path: &'a RequestPath,
    /// How many leading segments of `path` named the mount point.
    pub mount_depth: usize,
    /// The client's address.
    pub peer: &'a Address,
}

impl Request<'_> {
    /// The method (`GET`, `HEAD`, ...). A resource renders `HEAD` like
    /// `GET`: the server drops the body and keeps its length.
    pub fn method(&self) -> &str {
        self.head.method()
    }

    /// The first value of header `name`, any case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }

    /// The path's segments below the mount point.
    pub fn segments(&self) -> &[String] {
        &self.path.segments[self.mount_depth.min(self.path.segments.len())..]
    }

    /// The undecoded query string, if there is one.
    pub fn query(&self) -> Option<&str> {
        self.path.query.as_deref()
    }
}

/// Something that answers requests (Twisted's `Resource.render`). Renders
/// run on the reactor thread: a slow one holds every connection up, so
/// hand slow work to a [`BodyStream`](super::response::BodyStream) or a
/// thread.
pub trait Resource {
    /// The response to `request`.
    fn render(&self, request: &Request<'_>) -> Response;

    /// The methods it answers; any other gets 405 with `Allow` listing
    /// these. `HEAD` is answered wherever `GET` is. `"*"` lets every
    /// method through to `render` (a router decides per path).
    fn allowed_methods(&self) -> &[&'static str] {
        &["GET", "HEAD"]
    }
}

/// Renders `request` with `resource`, or 405 (with `Allow`) if the
/// resource does not answer its method.
pub fn render(resource: &dyn Resource, request: &Request<'_>) -> Response {
    let allowed = resource.allowed_methods();
    let method = request.method();
    if allowed.contains(&"*") || allowed.contains(&method) || (method == "HEAD" && allowed.contains(&"GET")) {
        return resource.render(request);
    }
    let mut allow: Vec<&str> = allowed.to_vec();
    if allow.contains(&"GET") && !allow.contains(&"HEAD") {
        allow.push("HEAD");
    }
    Response::error(405).header("Allow", allow.join(", "))
}

impl<F: Fn(&Request<'_>) -> Response> Resource for F {
    fn render(&self, request: &Request<'_>) -> Response {
        self(request)
    }
}

/// Resources mounted at paths; a request goes to the one mounted at the
/// longest prefix of its path (whole segments), or gets 404.
#[derive(Default, Clone)]
pub struct Router {
    mounts: Vec<(Vec<String>, Rc<dyn Resource>)>,
}

impl Router {
    /// No mounts yet.
    pub fn new() -> Self {
        Router::default()
    }

    /// Mounts `resource` at `path` (`/`, `/api`, `/api/v1`); an earlier
    /// mount at the same path is replaced.
    pub fn mount(mut self, path: &str, resource: impl Resource + 'static) -> Self {
        let segments: Vec<String> = path.split('/').filter(|s| !s.is_empty()).map(String::from).collect();
        self.mounts.retain(|(s, _)| *s != segments);
        self.mounts.push((segments, Rc::new(resource)));
        // Longest first, so the first match is the most specific.
        self.mounts.sort_by_key(|m| std::cmp::Reverse(m.0.len()));
        self
    }

    /// The resource for `path` and how many segments its mount took.
    pub fn find(&self, path: &RequestPath) -> Option<(&Rc<dyn Resource>, usize)> {
        self.mounts
            .iter()
            .find(|(prefix, _)| path.segments.starts_with(prefix))
            .map(|(prefix, r)| (r, prefix.len()))
    }
}

impl Resource for Router {
    fn render(&self, request: &Request<'_>) -> Response {
        match self.find(request.path) {
            Some((resource, depth)) => {
                let inner = Request {
                    head: request.head,
                    path: request.path,
                    mount_depth: depth,
                    peer: request.peer,
                };
                render(&**resource, &inner)
            }
            None => Response::error(404),
        }
    }

    fn allowed_methods(&self) -> &[&'static str] {
        &["*"]
    }
}
