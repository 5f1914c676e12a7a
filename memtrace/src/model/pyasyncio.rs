//! asyncio tasks of a CPython 3.14+ process, read from outside as
//! `python -m asyncio ps` reads them: the `_asyncio` module's
//! `_Py_AsyncioModuleDebugOffsets` (its `.AsyncioDebug` section) says where
//! each thread state and the interpreter keep their lists of live tasks,
//! intrusive lists of `llist_node`s. Counting them is a walk of those
//! lists through `/proc/PID/mem`, bounded: the memory is the process's, not
//! trusted.
use std::path::Path;

use object::{Object as _, ObjectSection as _};

use super::{procinfo::FileMappings, pycode::RemoteMemory, pydebug::DebugOffsets};

/// Bytes of `_Py_AsyncioModuleDebugOffsets`: 13 `u64` (3.14, 3.15).
const ASYNCIO_DEBUG_SIZE: usize = 13 * 8;
/// Tasks counted at most per process: a longer list (or one that never
/// comes back to its head) is reported as this many, saturated.
pub const MAX_TASKS: u64 = 100_000;
/// Thread states walked at most.
const MAX_THREADS: usize = 4096;

/// Where the task lists are, from the `_asyncio` module's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AsyncioOffsets {
    /// `asyncio_interpreter_state.asyncio_tasks_head`: in the interpreter.
    pub interp_tasks_head: u64,
    /// `asyncio_thread_state.asyncio_tasks_head`: in each thread state.
    pub thread_tasks_head: u64,
}

impl AsyncioOffsets {
    /// Parses and checks the table's 104 bytes.
    pub fn parse(b: &[u8]) -> Result<Self, String> {
        if b.len() < ASYNCIO_DEBUG_SIZE {
            return Err(format!(".AsyncioDebug has {} bytes, not 104", b.len()));
        }
        let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
        let (task_size, task_node) = (w(0), w(6));
        let (interp_size, interp_head) = (w(7), w(8));
        let (thread_size, thread_head) = (w(9), w(12));
        let inside = |size: u64, at: u64| {
            (1..=1 << 24).contains(&size)
                && at.is_multiple_of(8)
                && at.checked_add(16).is_some_and(|e| e <= size)
        };
        if !inside(task_size, task_node)
            || !inside(interp_size, interp_head)
            || !inside(thread_size, thread_head)
        {
            return Err(format!(
                "_Py_AsyncioModuleDebugOffsets does not validate (task {task_size}/{task_node}, interpreter {interp_size}/{interp_head}, thread {thread_size}/{thread_head})"
            ));
        }
        Ok(Self {
            interp_tasks_head: interp_head,
            thread_tasks_head: thread_head,
        })
    }

    /// The table of the `_asyncio` module a process has mapped (or built
    /// into its interpreter), read from the file through /proc/PID/root.
    /// `Ok(None)`: the module is not loaded (yet).
    pub fn of_process(
        pid: u32,
        maps: &FileMappings,
        interpreter: &Path,
    ) -> Result<Option<Self>, String> {
        let module = maps
            .paths()
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("_asyncio."))
            })
            .map(Path::to_path_buf);
        for candidate in module.iter().map(|p| p.as_path()).chain([interpreter]) {
            let relative = candidate.strip_prefix("/").unwrap_or(candidate);
            let open = Path::new(&format!("/proc/{pid}/root")).join(relative);
            let Ok(data) = crate::bounds::read_object(&open) else {
                continue;
            };
            let Ok(file) = object::File::parse(&*data) else {
                continue;
            };
            if let Some(section) = file.section_by_name(".AsyncioDebug") {
                let bytes = section.data().map_err(|e| e.to_string())?;
                return Self::parse(bytes).map(Some);
            }
        }
        Ok(None)
    }
}

/// Live tasks of the process: those on every thread state's list and on
/// the interpreter's (tasks whose thread exited). Saturates at
/// `MAX_TASKS`; `None` when a pointer cannot be read.
pub fn count_tasks(
    mem: &impl RemoteMemory,
    table: &DebugOffsets,
    runtime: u64,
    asyncio: &AsyncioOffsets,
) -> Option<u64> {
    let word = |addr: u64| -> Option<u64> {
        let mut b = [0u8; 8];
        mem.read(addr, &mut b).ok()?;
        Some(u64::from_le_bytes(b))
    };
    let next_at = table.get("llist_node", "next")?;
    let interp = word(runtime.checked_add(table.get("runtime_state", "interpreters_head")?)?)?;
    if interp == 0 {
        return Some(0);
    }
    let mut budget = MAX_TASKS;
    let mut count = 0;
    let mut walk = |head: u64, count: &mut u64| -> Option<()> {
        let mut node = word(head.checked_add(next_at)?)?;
        while node != head && node != 0 {
            if budget == 0 {
                return Some(());
            }
            budget -= 1;
            *count += 1;
            node = word(node.checked_add(next_at)?)?;
        }
        Some(())
    };
    walk(interp.checked_add(asyncio.interp_tasks_head)?, &mut count)?;
    let mut tstate = word(interp.checked_add(table.get("interpreter_state", "threads_head")?)?)?;
    let next_thread = table.get("thread_state", "next")?;
    for _ in 0..MAX_THREADS {
        if tstate == 0 {
            break;
        }
        walk(tstate.checked_add(asyncio.thread_tasks_head)?, &mut count)?;
        tstate = word(tstate.checked_add(next_thread)?)?;
    }
    Some(count.min(MAX_TASKS))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn table(sizes: [u64; 13]) -> Vec<u8> {
        sizes.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn the_table_is_checked() {
        // 3.14's layout: task {size, name, awaited_by, is_task,
        // awaited_by_is_set, coro, node}, interp {size, head}, thread
        // {size, loop, task, head}.
        let ok = table([200, 16, 24, 32, 33, 40, 48, 2000, 1000, 1200, 8, 16, 1104]);
        assert_eq!(
            AsyncioOffsets::parse(&ok),
            Ok(AsyncioOffsets {
                interp_tasks_head: 1000,
                thread_tasks_head: 1104
            })
        );
        assert!(AsyncioOffsets::parse(&ok[..100]).is_err());
        let outside = table([200, 16, 24, 32, 33, 40, 192, 2000, 1000, 1200, 8, 16, 1104]);
        assert!(AsyncioOffsets::parse(&outside).is_err());
        let misaligned = table([200, 16, 24, 32, 33, 40, 48, 2000, 1000, 1200, 8, 16, 1100]);
        assert!(AsyncioOffsets::parse(&misaligned).is_err());
        assert!(AsyncioOffsets::parse(&outside).is_err());
        let zero = table([0; 13]);
        assert!(AsyncioOffsets::parse(&zero).is_err());
    }

    struct Fake(HashMap<u64, u64>);

    impl RemoteMemory for Fake {
        fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
            let v = self.0.get(&addr).ok_or(std::io::ErrorKind::NotFound)?;
            buf.copy_from_slice(&v.to_le_bytes()[..buf.len()]);
            Ok(())
        }
    }

    fn debug_table() -> DebugOffsets {
        // A 3.14 table whose llist_node.next is 0, interpreters_head 40,
        // threads_head 72, thread next 16.
        let version = 0x030e_0af0;
        let mut words = vec![0u64; 95];
        let set = |words: &mut Vec<u64>, i: usize, v: u64| words[i] = v;
        // Every section size first, at the start of each section.
        for (i, v) in [
            (3, 500_000),
            (6, 4000),
            (22, 1000),
            (31, 80),
            (39, 200),
            (50, 16),
            (52, 400),
            (56, 24),
            (59, 24),
            (62, 200),
            (66, 48),
            (69, 24),
            (71, 32),
            (74, 40),
            (77, 72),
            (81, 16),
            (83, 80),
        ] {
            set(&mut words, i, v);
        }
        set(&mut words, 5, 40); // interpreters_head
        set(&mut words, 9, 72); // threads_head
        set(&mut words, 24, 16); // thread next
        set(&mut words, 26, 72); // current_frame
        set(&mut words, 27, 80); // thread_id
        set(&mut words, 32, 8); // frame previous
        set(&mut words, 33, 0); // executable
        set(&mut words, 34, 56); // instr_ptr
        set(&mut words, 36, 74); // owner
        set(&mut words, 44, 48); // firstlineno
        set(&mut words, 51, 8); // ob_type
        let mut bytes = b"xdebugpy".to_vec();
        bytes.extend(u64::from(version).to_le_bytes());
        bytes.extend(0u64.to_le_bytes());
        for w in &words[3..95] {
            bytes.extend(w.to_le_bytes());
        }
        DebugOffsets::parse(&bytes, version).expect("a valid table")
    }

    #[test]
    fn tasks_are_counted_on_every_list_and_bounded() {
        let table = debug_table();
        let asyncio = AsyncioOffsets {
            interp_tasks_head: 1000,
            thread_tasks_head: 1100,
        };
        let runtime = 0x10_0000;
        let interp = 0x20_0000;
        let (t1, t2) = (0x30_0000, 0x40_0000);
        let mut m = HashMap::new();
        m.insert(runtime + 40, interp);
        m.insert(interp + 72, t1);
        m.insert(t1 + 16, t2);
        m.insert(t2 + 16, 0);
        // The interpreter's list is empty; t1 holds 3 tasks, t2 one.
        m.insert(interp + 1000, interp + 1000);
        let head1 = t1 + 1100;
        let tasks = [0x50_0000u64, 0x50_1000, 0x50_2000];
        m.insert(head1, tasks[0]);
        m.insert(tasks[0], tasks[1]);
        m.insert(tasks[1], tasks[2]);
        m.insert(tasks[2], head1);
        let head2 = t2 + 1100;
        m.insert(head2, 0x60_0000);
        m.insert(0x60_0000, head2);
        let mem = Fake(m);
        assert_eq!(count_tasks(&mem, &table, runtime, &asyncio), Some(4));

        // A list that never comes back to its head is cut at the bound.
        let mut m = mem.0.clone();
        m.insert(tasks[2], tasks[0]);
        let cyclic = Fake(m);
        assert_eq!(
            count_tasks(&cyclic, &table, runtime, &asyncio),
            Some(MAX_TASKS)
        );
        // An unreadable pointer: no count, not a wrong one.
        let mut m = mem.0.clone();
        m.remove(&tasks[1]);
        assert_eq!(count_tasks(&Fake(m), &table, runtime, &asyncio), None);
    }
}
