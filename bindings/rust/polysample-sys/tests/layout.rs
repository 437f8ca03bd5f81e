//! Checks the hand-written declarations against include/polysample.h with
//! the system C compiler (`$CC`, default `cc`):
//! - every struct's size and alignment, and every field's offset and size;
//! - every enum's size and signedness and every constant's value;
//! - every function's signature (the C compiler must accept assigning the
//!   function to a pointer of the type written next to the Rust one);
//! - that the header has no struct field, constant or function that is not
//!   declared here, and the other way round (the header is read as text).
//!
//! The header checked is the one build.rs linked against
//! (POLYSAMPLE_SYS_INCLUDE_DIR).

use polysample_sys::*;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void};
use std::mem::{align_of, offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;

const INCLUDE_DIR: &str = env!("POLYSAMPLE_SYS_INCLUDE_DIR");

fn field_size<S, F, G: Fn(&S) -> &F>(_field: G) -> usize {
    size_of::<F>()
}

/// One checked fact: a name, the value Rust has, and the C expression that
/// must have the same value.
struct Fact {
    name: String,
    rust: i64,
    c_expression: String,
}

macro_rules! struct_facts {
    ($($s:ident { $($f:ident),* $(,)? })*) => {
        fn struct_facts(facts: &mut Vec<Fact>) {
            $(
                facts.push(Fact { name: format!("sizeof {}", stringify!($s)), rust: size_of::<$s>() as i64,
                                  c_expression: format!("sizeof({})", stringify!($s)) });
                facts.push(Fact { name: format!("alignof {}", stringify!($s)), rust: align_of::<$s>() as i64,
                                  c_expression: format!("_Alignof({})", stringify!($s)) });
                $(
                    facts.push(Fact {
                        name: format!("offsetof {}.{}", stringify!($s), stringify!($f)),
                        rust: offset_of!($s, $f) as i64,
                        c_expression: format!("offsetof({}, {})", stringify!($s), stringify!($f)),
                    });
                    facts.push(Fact {
                        name: format!("sizeof {}.{}", stringify!($s), stringify!($f)),
                        rust: field_size(|value: &$s| &value.$f) as i64,
                        c_expression: format!("sizeof((({} *)0)->{})", stringify!($s), stringify!($f)),
                    });
                )*
            )*
        }
        const RUST_STRUCTS: &[(&str, &[&str])] = &[$((stringify!($s), &[$(stringify!($f)),*])),*];
    };
}

struct_facts! {
    psm_context_options { backend, device_index, cpu_threads, native_stream, check_rows, notice, notice_user_data }
    psm_tensor { data, dtype, memory, rows, vocab, row_stride }
    psm_logit_processing { allowed_mask, allowed_mask_words, bias_offsets, bias_tokens, bias_values,
                           history_offsets, history_tokens, prompt_offsets, prompt_tokens,
                           repetition_penalty, frequency_penalty, presence_penalty,
                           repetition_penalty_per_row, frequency_penalty_per_row,
                           presence_penalty_per_row }
    psm_params { temperature, top_k, top_p, min_p, seed, offset, num_samples,
                 temperature_per_row, top_k_per_row, top_p_per_row, min_p_per_row, seed_per_row,
                 offset_per_row, subsequence_per_row, seed_pointer, offset_pointer,
                 row_indices, output_rows, workspace, workspace_bytes, processing, top_logprobs,
                 filter_order }
    psm_output { data, memory }
    psm_top_logprobs { count, mode, tokens, logprobs, sampled_ranks }
    psm_drafts { nodes, tokens, parents, draft_logits, draft_params, draft_probs }
    psm_verification { accepted, tokens, path_nodes, logprobs }
    psm_shard { first_token, full_vocab, shard_index, shard_count }
}

macro_rules! constant_facts {
    ($($t:ident { $($c:ident),* $(,)? })* ; macros { $($m:ident),* $(,)? }) => {
        fn constant_facts(facts: &mut Vec<Fact>) {
            $(
                facts.push(Fact { name: format!("sizeof {}", stringify!($t)), rust: size_of::<$t>() as i64,
                                  c_expression: format!("sizeof({})", stringify!($t)) });
                facts.push(Fact {
                    name: format!("signed {}", stringify!($t)),
                    rust: (0 as $t).checked_sub(1).is_some() as i64,
                    c_expression: format!("(({})-1 < 0)", stringify!($t)),
                });
                $(
                    facts.push(Fact { name: stringify!($c).into(), rust: $c as i64, c_expression: stringify!($c).into() });
                )*
            )*
            $(
                facts.push(Fact { name: stringify!($m).into(), rust: $m as i64, c_expression: stringify!($m).into() });
            )*
        }
        const RUST_ENUMS: &[(&str, &[&str])] = &[$((stringify!($t), &[$(stringify!($c)),*])),*];
        const RUST_MACROS: &[&str] = &[$(stringify!($m)),*];
    };
}

constant_facts! {
    psm_status {
        PSM_OK, PSM_ERR_INVALID_ARGUMENT, PSM_ERR_INVALID_PARAMETER, PSM_ERR_UNSUPPORTED,
        PSM_ERR_BACKEND_NOT_COMPILED, PSM_ERR_NO_DEVICE, PSM_ERR_DRIVER, PSM_ERR_OUT_OF_MEMORY,
        PSM_ERR_BAD_ROW, PSM_ERR_WRONG_BACKEND, PSM_ERR_ENVIRONMENT, PSM_ERR_INTERNAL,
    }
    psm_backend { PSM_BACKEND_AUTO, PSM_BACKEND_CPU, PSM_BACKEND_CUDA, PSM_BACKEND_HIP, PSM_BACKEND_OPENCL }
    psm_dtype { PSM_DTYPE_F32, PSM_DTYPE_F16, PSM_DTYPE_BF16 }
    psm_memory { PSM_MEMORY_HOST, PSM_MEMORY_DEVICE }
    psm_logprob_mode { PSM_LOGPROBS_PROCESSED, PSM_LOGPROBS_RAW }
    psm_filter_order {
        PSM_FILTER_ORDER_POLYSAMPLE, PSM_FILTER_ORDER_VLLM, PSM_FILTER_ORDER_SGLANG,
        PSM_FILTER_ORDER_LLAMA_CPP, PSM_FILTER_ORDER_FLASHINFER_TOP_K_FIRST,
        PSM_FILTER_ORDER_FLASHINFER_JOINT,
    }
    ;
    macros { PSM_VERSION_MAJOR, PSM_VERSION_MINOR, PSM_VERSION_PATCH, PSM_VERSION_NUMBER, PSM_BACKEND_COUNT, PSM_MAX_CPU_THREADS,
             PSM_MAX_TOP_LOGPROBS, PSM_FILTER_ORDER_COUNT, PSM_MAX_DRAFT_NODES, PSM_MAX_SHARDS }
}

/// Each function with its C type (return type, parameter list) and its Rust
/// type: the Rust one is checked by the Rust compiler, the C one by the C
/// compiler against the header's prototype.
macro_rules! function_signatures {
    ($($name:ident: $c_return:literal ($c_parameters:literal) = $rust:ty;)*) => {
        #[allow(dead_code)]
        fn rust_signatures_compile() {
            $(let _: $rust = $name;)*
        }
        const RUST_FUNCTIONS: &[(&str, &str, &str)] = &[$((stringify!($name), $c_return, $c_parameters)),*];
    };
}

function_signatures! {
    psm_context_options_init: "void" ("psm_context_options *")
        = unsafe extern "C" fn(*mut psm_context_options);
    psm_context_create: "psm_status" ("const psm_context_options *, psm_context **")
        = unsafe extern "C" fn(*const psm_context_options, *mut *mut psm_context) -> psm_status;
    psm_context_destroy: "void" ("psm_context *")
        = unsafe extern "C" fn(*mut psm_context);
    psm_context_backend: "psm_backend" ("const psm_context *")
        = unsafe extern "C" fn(*const psm_context) -> psm_backend;
    psm_context_device_name: "const char *" ("const psm_context *")
        = unsafe extern "C" fn(*const psm_context) -> *const c_char;
    psm_context_selection_reason: "const char *" ("const psm_context *")
        = unsafe extern "C" fn(*const psm_context) -> *const c_char;
    psm_context_reserve: "psm_status" ("psm_context *, int64_t, int64_t, int64_t")
        = unsafe extern "C" fn(*mut psm_context, i64, i64, i64) -> psm_status;
    psm_logit_processing_init: "void" ("psm_logit_processing *")
        = unsafe extern "C" fn(*mut psm_logit_processing);
    psm_drafts_init: "void" ("psm_drafts *")
        = unsafe extern "C" fn(*mut psm_drafts);
    psm_params_init: "void" ("psm_params *")
        = unsafe extern "C" fn(*mut psm_params);
    psm_sample: "psm_status" ("psm_context *, const psm_tensor *, const psm_params *, psm_output, psm_output")
        = unsafe extern "C" fn(*mut psm_context, *const psm_tensor, *const psm_params, psm_output, psm_output) -> psm_status;
    psm_probs: "psm_status" ("psm_context *, const psm_tensor *, const psm_params *, const psm_tensor *")
        = unsafe extern "C" fn(*mut psm_context, *const psm_tensor, *const psm_params, *const psm_tensor) -> psm_status;
    psm_sample_workspace_size:
        "psm_status" ("psm_context *, const psm_tensor *, const psm_params *, psm_output, psm_output, size_t *")
        = unsafe extern "C" fn(*mut psm_context, *const psm_tensor, *const psm_params, psm_output, psm_output, *mut usize) -> psm_status;
    psm_probs_workspace_size:
        "psm_status" ("psm_context *, const psm_tensor *, const psm_params *, const psm_tensor *, size_t *")
        = unsafe extern "C" fn(*mut psm_context, *const psm_tensor, *const psm_params, *const psm_tensor, *mut usize) -> psm_status;
    psm_verify:
        "psm_status" ("psm_context *, const psm_tensor *, const psm_params *, const psm_drafts *, const psm_verification *")
        = unsafe extern "C" fn(*mut psm_context, *const psm_tensor, *const psm_params, *const psm_drafts, *const psm_verification) -> psm_status;
    psm_sharded_begin:
        "psm_status" ("psm_context *, const psm_tensor *, const psm_shard *, const psm_params *, psm_output, psm_output, psm_sharded **")
        = unsafe extern "C" fn(*mut psm_context, *const psm_tensor, *const psm_shard, *const psm_params, psm_output, psm_output, *mut *mut psm_sharded) -> psm_status;
    psm_sharded_next: "psm_status" ("psm_sharded *, const void *, size_t, const void **, size_t *")
        = unsafe extern "C" fn(*mut psm_sharded, *const c_void, usize, *mut *const c_void, *mut usize) -> psm_status;
    psm_sharded_end: "void" ("psm_sharded *")
        = unsafe extern "C" fn(*mut psm_sharded);
    psm_synchronize: "psm_status" ("psm_context *")
        = unsafe extern "C" fn(*mut psm_context) -> psm_status;
    psm_status_string: "const char *" ("psm_status")
        = unsafe extern "C" fn(psm_status) -> *const c_char;
    psm_last_error: "const char *" ("void")
        = unsafe extern "C" fn() -> *const c_char;
    psm_version_string: "const char *" ("void")
        = unsafe extern "C" fn() -> *const c_char;
    psm_version_number: "int" ("void")
        = unsafe extern "C" fn() -> c_int;
    psm_backend_name: "const char *" ("psm_backend")
        = unsafe extern "C" fn(psm_backend) -> *const c_char;
    psm_backend_compiled: "int" ("psm_backend")
        = unsafe extern "C" fn(psm_backend) -> c_int;
    psm_backend_available: "int" ("psm_backend, const char **")
        = unsafe extern "C" fn(psm_backend, *mut *const c_char) -> c_int;
    psm_backend_device_count: "int" ("psm_backend")
        = unsafe extern "C" fn(psm_backend) -> c_int;
}

/// The notice callback's type is part of psm_context_options; its size is
/// checked there, its parameters here.
const NOTICE_C_TYPE: &str = "void (*)(void *, const char *)";
#[allow(dead_code)]
fn notice_type_compiles(options: psm_context_options) -> Option<unsafe extern "C" fn(*mut c_void, *const c_char)> {
    options.notice
}

fn scratch_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("polysample-sys-layout");
    std::fs::create_dir_all(&dir).expect("create the scratch directory");
    dir
}

fn c_compiler() -> String {
    std::env::var("CC").unwrap_or_else(|_| "cc".into())
}

/// Compiles `source` with the header; `run` also links and runs it and
/// returns its stdout.
fn compile_c(stem: &str, source: &str, run: bool) -> String {
    let dir = scratch_dir();
    let source_path = dir.join(format!("{stem}.c"));
    let binary_path = dir.join(stem);
    std::fs::write(&source_path, source).expect("write the C source");
    let mut command = Command::new(c_compiler());
    command.args(["-std=c11", "-Wall", "-Werror", "-I", INCLUDE_DIR]).arg(&source_path);
    if run {
        command.arg("-o").arg(&binary_path);
    } else {
        // -Wextra too; the layout program's signedness tests would trip its
        // "comparison is always false" warning.
        command.args(["-Wextra", "-fsyntax-only"]);
    }
    let output =
        command.output().unwrap_or_else(|error| panic!("could not run the C compiler {:?}: {error}", c_compiler()));
    assert!(
        output.status.success(),
        "the C compiler rejected {}:\n{}",
        source_path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    if !run {
        return String::new();
    }
    let output = Command::new(&binary_path).output().expect("run the layout program");
    assert!(output.status.success(), "{} failed", binary_path.display());
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

#[test]
fn sizes_offsets_and_constants_match_the_c_compiler() {
    let mut facts = Vec::new();
    struct_facts(&mut facts);
    constant_facts(&mut facts);
    let mut source =
        String::from("#include <stddef.h>\n#include <stdio.h>\n#include <polysample.h>\n\nint main(void)\n{\n");
    for fact in &facts {
        source
            .push_str(&format!("    printf(\"%s=%lld\\n\", \"{}\", (long long)({}));\n", fact.name, fact.c_expression));
    }
    source.push_str("    return 0;\n}\n");
    let c_values: BTreeMap<String, i64> = compile_c("layout", &source, true)
        .lines()
        .map(|line| {
            let (name, value) = line.split_once('=').expect("name=value");
            (name.to_string(), value.parse().expect("an integer"))
        })
        .collect();

    let mismatches: Vec<String> = facts
        .iter()
        .filter(|fact| c_values[&fact.name] != fact.rust)
        .map(|fact| format!("{}: C {} but Rust {}", fact.name, c_values[&fact.name], fact.rust))
        .collect();
    assert!(mismatches.is_empty(), "Rust declarations differ from the header:\n{}", mismatches.join("\n"));
    // Guards against a generator that silently checks nothing.
    assert_eq!(c_values.len(), facts.len());
    assert!(facts.len() > 80, "only {} facts checked", facts.len());
}

#[test]
fn function_signatures_match_the_header() {
    let mut source = String::from("#include <polysample.h>\n\nint main(void)\n{\n");
    for (name, c_return, c_parameters) in RUST_FUNCTIONS {
        source.push_str(&format!(
            "    {c_return} (*volatile check_{name})({c_parameters}) = {name};\n    (void)check_{name};\n"
        ));
    }
    source.push_str(&format!(
        "    psm_context_options options;\n    psm_context_options_init(&options);\n    {} = options.notice;\n    (void)check_notice;\n",
        NOTICE_C_TYPE.replace("(*)", "(*check_notice)")
    ));
    source.push_str("    return 0;\n}\n");
    // -Werror turns an incompatible function-pointer assignment into a failure.
    compile_c("signatures", &source, false);
}

#[test]
fn every_header_item_is_declared() {
    let header = std::fs::read_to_string(Path::new(INCLUDE_DIR).join("polysample.h")).expect("read polysample.h");
    let parsed = parse_header(&header);
    let mut problems = Vec::new();

    let rust_structs: BTreeMap<&str, Vec<&str>> =
        RUST_STRUCTS.iter().map(|(name, fields)| (*name, fields.to_vec())).collect();
    for (name, fields) in &parsed.structs {
        match rust_structs.get(name.as_str()) {
            None => problems.push(format!("struct {name} is not checked")),
            Some(rust_fields) if rust_fields != fields => {
                problems.push(format!("struct {name}: header fields {fields:?}, checked fields {rust_fields:?}"))
            }
            Some(_) => {}
        }
    }
    let rust_enums: BTreeMap<&str, Vec<&str>> =
        RUST_ENUMS.iter().map(|(name, values)| (*name, values.to_vec())).collect();
    for (name, values) in &parsed.enums {
        match rust_enums.get(name.as_str()) {
            None => problems.push(format!("enum {name} is not checked")),
            Some(rust_values) if rust_values != values => {
                problems.push(format!("enum {name}: header values {values:?}, checked values {rust_values:?}"))
            }
            Some(_) => {}
        }
    }
    let rust_functions: Vec<&str> = RUST_FUNCTIONS.iter().map(|(name, _, _)| *name).collect();
    if parsed.functions != rust_functions {
        problems.push(format!("header functions {:?}\nchecked functions {rust_functions:?}", parsed.functions));
    }
    if parsed.macros != RUST_MACROS {
        problems.push(format!("header constants {:?}, checked constants {RUST_MACROS:?}", parsed.macros));
    }
    if parsed.structs.len() != RUST_STRUCTS.len() || parsed.enums.len() != RUST_ENUMS.len() {
        problems.push(format!(
            "header has {} structs and {} enums, {} and {} are checked",
            parsed.structs.len(),
            parsed.enums.len(),
            RUST_STRUCTS.len(),
            RUST_ENUMS.len()
        ));
    }
    assert!(problems.is_empty(), "header and declarations differ:\n{}", problems.join("\n"));
}

struct ParsedHeader {
    structs: Vec<(String, Vec<String>)>,
    enums: Vec<(String, Vec<String>)>,
    functions: Vec<String>,
    macros: Vec<String>,
}

/// Reads the declarations out of polysample.h's text. It handles what the
/// header's style uses (one declarator per line, typedef'd structs and
/// enums, PSM_API before each function), and the counts checked above catch
/// it missing something.
fn parse_header(text: &str) -> ParsedHeader {
    let code = strip_comments(text);
    let mut macros = Vec::new();
    let mut declarations = String::new();
    for line in code.lines() {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("#define ") {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            // PSM_API is an attribute and the include guard is not an item.
            if name.starts_with("PSM_") && name != "PSM_API" && !macros.contains(&name) {
                macros.push(name);
            }
        } else if !trimmed.starts_with('#') {
            declarations.push_str(line);
            declarations.push('\n');
        }
    }
    // Macro continuation lines hold no declarations in this header.
    let declarations = declarations.replace("\\\n", " ");

    let structs = typedef_bodies(&declarations, "typedef struct ")
        .into_iter()
        .map(|(name, body)| {
            let fields = body
                .split(';')
                .map(str::trim)
                .filter(|declaration| !declaration.is_empty())
                .map(|declaration| match declaration.find("(*") {
                    Some(start) => {
                        let rest = &declaration[start + 2..];
                        rest[..rest.find(')').expect("closing parenthesis")].trim().to_string()
                    }
                    None => last_identifier(declaration),
                })
                .collect();
            (name, fields)
        })
        .collect();
    let enums = typedef_bodies(&declarations, "typedef enum ")
        .into_iter()
        .map(|(name, body)| {
            let values = body
                .split(',')
                .map(str::trim)
                .filter(|entry| !entry.is_empty())
                .map(|entry| entry.split('=').next().unwrap().trim().to_string())
                .collect();
            (name, values)
        })
        .collect();
    let functions = declarations
        .split("PSM_API")
        .skip(1)
        .map(|declaration| last_identifier(&declaration[..declaration.find('(').expect("a prototype")]))
        .collect();
    ParsedHeader { structs, enums, functions, macros }
}

fn strip_comments(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("/*") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("*/").expect("unterminated comment");
        rest = &rest[start + end + 2..];
    }
    out.push_str(rest);
    out.lines().map(|line| line.split("//").next().unwrap()).collect::<Vec<_>>().join("\n")
}

/// (typedef name, text between the braces) for each `keyword NAME { ... }`.
fn typedef_bodies(code: &str, keyword: &str) -> Vec<(String, String)> {
    let mut bodies = Vec::new();
    let mut rest = code;
    while let Some(start) = rest.find(keyword) {
        rest = &rest[start + keyword.len()..];
        let open = rest.find(['{', ';']).expect("a body or a forward declaration");
        if rest.as_bytes()[open] == b';' {
            continue; // an opaque type such as psm_context
        }
        let close = rest.find('}').expect("closing brace");
        let name = rest[..open].trim().to_string();
        bodies.push((name, rest[open + 1..close].to_string()));
        rest = &rest[close..];
    }
    bodies
}

fn last_identifier(declaration: &str) -> String {
    let trimmed = declaration.trim_end();
    let start = trimmed.rfind(|c: char| !(c.is_alphanumeric() || c == '_')).map_or(0, |index| index + 1);
    trimmed[start..].to_string()
}
