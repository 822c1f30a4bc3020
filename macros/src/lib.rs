//! `#[postbox::test]`: one async test body, run on the in-memory fake and on Postgres.
//!
//! Use it through the facade (`postbox = { features = ["testkit"] }`), where it is documented
//! with examples: `postbox::test`. This crate only expands the attribute; what the expansion
//! calls lives in `postbox::testkit`.
//!
//! The expansion keeps the function as written and adds a module of the same name (modules and
//! functions live in different namespaces) with one `#[test]` per backend, so the test names
//! say which backend ran: `order_is_published::fake`, `order_is_published::postgres`.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, LitStr, Path, Type, parse_macro_input};

/// Runs an async test body on `FakeBroker` (paused time) and on a fresh Postgres database.
///
/// See `postbox::test` for the options and examples.
#[proc_macro_attribute]
pub fn test(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut options = Options::default();
    let parser = syn::meta::parser(|meta| options.parse(meta));
    parse_macro_input!(args with parser);
    let item = parse_macro_input!(item as ItemFn);
    expand(options, item)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// The attribute's arguments.
#[derive(Default)]
struct Options {
    fake: bool,
    postgres: bool,
    table: Option<LitStr>,
    sql: Vec<LitStr>,
    setup: Option<Path>,
    krate: Option<Path>,
    /// The first option that only applies to Postgres, for the error when Postgres is off.
    pg_only: Option<Span>,
}

impl Options {
    fn parse(&mut self, meta: syn::meta::ParseNestedMeta<'_>) -> syn::Result<()> {
        if meta.path.is_ident("fake") {
            self.fake = true;
        } else if meta.path.is_ident("postgres") {
            self.postgres = true;
        } else if meta.path.is_ident("table") {
            let table: LitStr = meta.value()?.parse()?;
            check_table(&table)?;
            self.pg_only.get_or_insert(table.span());
            self.table = Some(table);
        } else if meta.path.is_ident("sql") {
            let file: LitStr = meta.value()?.parse()?;
            self.pg_only.get_or_insert(file.span());
            self.sql.push(file);
        } else if meta.path.is_ident("setup") {
            let setup: Path = meta.value()?.parse()?;
            self.pg_only.get_or_insert(setup.span());
            self.setup = Some(setup);
        } else if meta.path.is_ident("crate") {
            let path: LitStr = meta.value()?.parse()?;
            self.krate = Some(path.parse()?);
        } else {
            return Err(meta.error(
                "unknown option; expected `fake`, `postgres`, `table = \"..\"`, \
                 `sql = \"path/to/file.sql\"`, `setup = path::to::fn` or `crate = \"..\"`",
            ));
        }
        Ok(())
    }

    /// Both backends unless the attribute names one or the other.
    fn backends(&self) -> (bool, bool) {
        if self.fake || self.postgres {
            (self.fake, self.postgres)
        } else {
            (true, true)
        }
    }
}

/// The character rules of `postbox::TableName`, checked at compile time so a typo fails the
/// build rather than the test (the length limit is checked when the test runs).
fn check_table(table: &LitStr) -> syn::Result<()> {
    let name = table.value();
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(syn::Error::new(
            table.span(),
            "an outbox table name is made of a-z, 0-9 and _, and does not start with a digit",
        ))
    }
}

/// What the body receives.
enum Argument {
    /// No parameter.
    None,
    /// `TestContext<..>` by value.
    Context,
    /// `&TestContext<..>`.
    ContextRef,
    /// The backend by value (a clone of the context's).
    Backend,
    /// `&B`.
    BackendRef,
}

fn argument(item: &ItemFn) -> syn::Result<Argument> {
    let mut inputs = item.sig.inputs.iter();
    let Some(first) = inputs.next() else {
        return Ok(Argument::None);
    };
    if let Some(extra) = inputs.next() {
        return Err(syn::Error::new(
            extra.span(),
            "#[postbox::test] passes one argument: the backend (`b: impl TestBackend`) or the \
             context (`ctx: TestContext<impl TestBackend>`)",
        ));
    }
    let FnArg::Typed(typed) = first else {
        return Err(syn::Error::new(
            first.span(),
            "#[postbox::test] cannot take `self`",
        ));
    };
    let (by_ref, ty) = match &*typed.ty {
        Type::Reference(r) => (true, &*r.elem),
        ty => (false, ty),
    };
    let is_context = matches!(ty, Type::Path(p)
        if p.path.segments.last().is_some_and(|s| s.ident == "TestContext"));
    Ok(match (is_context, by_ref) {
        (true, false) => Argument::Context,
        (true, true) => Argument::ContextRef,
        (false, false) => Argument::Backend,
        (false, true) => Argument::BackendRef,
    })
}

fn expand(options: Options, mut item: ItemFn) -> syn::Result<TokenStream2> {
    if item.sig.asyncness.is_none() {
        return Err(syn::Error::new(
            item.sig.fn_token.span(),
            "#[postbox::test] runs an `async fn`",
        ));
    }
    let (fake, postgres) = options.backends();
    if let (false, Some(span)) = (postgres, options.pg_only) {
        return Err(syn::Error::new(
            span,
            "`table`, `sql` and `setup` prepare the Postgres run, and this test runs on the fake only",
        ));
    }
    let krate = options
        .krate
        .clone()
        .unwrap_or_else(|| syn::parse_quote!(::postbox));
    let private = quote!(#krate::testkit::__private);
    let name = &item.sig.ident;
    let output = &item.sig.output;
    let argument = match argument(&item)? {
        Argument::None => quote!(),
        Argument::Context => quote!(__ctx),
        Argument::ContextRef => quote!(&__ctx),
        Argument::Backend => quote!(::core::clone::Clone::clone(__ctx.backend())),
        Argument::BackendRef => quote!(__ctx.backend()),
    };

    // `#[ignore]` and `#[should_panic]` belong on the generated tests; the rest stays.
    let (test_attrs, kept): (Vec<_>, Vec<_>) = item
        .attrs
        .drain(..)
        .partition(|a| a.path().is_ident("ignore") || a.path().is_ident("should_panic"));
    item.attrs = kept;
    // Under `#[should_panic]` a panic is the test passing: its database is not kept.
    let expect_panic = test_attrs.iter().any(|a| a.path().is_ident("should_panic"));

    let fake_test = fake.then(|| {
        quote! {
            #[::core::prelude::v1::test]
            #(#test_attrs)*
            pub(super) fn fake() #output {
                #private::run_fake(
                    ::core::module_path!(),
                    |__ctx| async move { super::#name(#argument).await },
                )
            }
        }
    });
    let postgres_test = postgres.then(|| {
        let table = match &options.table {
            Some(t) => quote!(::core::option::Option::Some(#t)),
            None => quote!(::core::option::Option::None),
        };
        let sql = options.sql.iter().map(|file| {
            quote_spanned! {file.span()=>
                (#file, ::core::include_str!(::core::concat!(
                    ::core::env!("CARGO_MANIFEST_DIR"), "/", #file
                )))
            }
        });
        let setup = options.setup.as_ref().map(|setup| {
            quote_spanned! {setup.span()=>
                #private::setup_done(
                    ::core::stringify!(#setup),
                    #setup(#private::pg_pool(&__ctx)).await,
                );
            }
        });
        quote! {
            #[::core::prelude::v1::test]
            #(#test_attrs)*
            pub(super) fn postgres() #output {
                #private::run_postgres(
                    ::core::module_path!(),
                    #private::PgSetup {
                        table: #table,
                        sql: &[#(#sql),*],
                        expect_panic: #expect_panic,
                    },
                    |__ctx| async move {
                        #setup
                        super::#name(#argument).await
                    },
                )
            }
        }
    });

    Ok(quote! {
        #[cfg_attr(not(test), allow(dead_code))]
        #item

        #[cfg(test)]
        #[doc(hidden)]
        mod #name {
            // The set-up function and the types in the signature are named from the parent.
            #[allow(unused_imports)]
            use super::*;

            #fake_test
            #postgres_test
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_str(args: &str, item: &str) -> Result<String, String> {
        let mut options = Options::default();
        let parser = syn::meta::parser(|meta| options.parse(meta));
        syn::parse::Parser::parse_str(parser, args).map_err(|e| e.to_string())?;
        let item: ItemFn = syn::parse_str(item).map_err(|e| e.to_string())?;
        expand(options, item)
            .map(|t| t.to_string())
            .map_err(|e| e.to_string())
    }

    #[::core::prelude::v1::test]
    fn both_backends_by_default_one_when_named() {
        let both = expand_str("", "async fn t(b: impl TestBackend) {}").expect("expands");
        assert!(both.contains("fn fake") && both.contains("fn postgres"));
        let fake = expand_str("fake", "async fn t(b: impl TestBackend) {}").expect("expands");
        assert!(fake.contains("fn fake") && !fake.contains("fn postgres"));
        let pg = expand_str("postgres", "async fn t() {}").expect("expands");
        assert!(!pg.contains("fn fake") && pg.contains("fn postgres"));
    }

    #[::core::prelude::v1::test]
    fn the_argument_is_chosen_by_its_type() {
        let by_ctx =
            expand_str("fake", "async fn t(c: TestContext<impl TestBackend>) {}").expect("expands");
        assert!(by_ctx.contains("super :: t (__ctx)"), "{by_ctx}");
        let by_ref = expand_str(
            "fake",
            "async fn t(c: &postbox::testkit::TestContext<B>) {}",
        )
        .expect("expands");
        assert!(by_ref.contains("super :: t (& __ctx)"), "{by_ref}");
        let backend = expand_str("fake", "async fn t<B: TestBackend>(b: &B) {}").expect("expands");
        assert!(
            backend.contains("super :: t (__ctx . backend ())"),
            "{backend}"
        );
    }

    #[::core::prelude::v1::test]
    fn bad_input_is_refused_with_a_reason() {
        let refused = |args: &str, item: &str| expand_str(args, item).expect_err("refused");
        assert!(refused("", "fn t() {}").contains("async fn"));
        assert!(refused("", "async fn t(a: u8, b: u8) {}").contains("one argument"));
        assert!(refused("table = \"Orders\"", "async fn t() {}").contains("a-z, 0-9 and _"));
        assert!(refused("table = \"1x\"", "async fn t() {}").contains("does not start"));
        assert!(refused("fake, sql = \"a.sql\"", "async fn t() {}").contains("fake only"));
        assert!(refused("backend = \"pg\"", "async fn t() {}").contains("unknown option"));
    }

    #[::core::prelude::v1::test]
    fn ignore_and_should_panic_move_to_the_tests() {
        let out =
            expand_str("", "#[ignore] #[should_panic] /// doc\nasync fn t() {}").expect("expands");
        assert_eq!(out.matches("# [ignore]").count(), 2, "{out}");
        assert_eq!(out.matches("# [should_panic]").count(), 2, "{out}");
        assert!(out.contains("expect_panic : true"), "{out}");
        let plain = expand_str("postgres", "async fn t() {}").expect("expands");
        assert!(plain.contains("expect_panic : false"), "{plain}");
    }
}
