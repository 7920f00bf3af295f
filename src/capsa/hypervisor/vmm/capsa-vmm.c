/*
 * capsa-vmm: the parent a jailed QEMU needs outside its PID namespace.
 *
 *   capsa-vmm PROGRAM [ARG...]
 *
 * Started by capsa (hypervisor/jail.py) already confined: its own mount and
 * IPC namespaces, a jail root, no capabilities, the sandbox's uid, and a
 * PID namespace for its children (unshare(2) CLONE_NEWPID moves only the
 * caller's children).  It forks PROGRAM, which becomes PID 1 of that
 * namespace, and then only:
 *
 *   - passes SIGTERM, SIGINT and SIGHUP on to it;
 *   - exits as it exits: the same status, or killed by the same signal;
 *   - makes it die with a SIGKILL when capsa-vmm dies (PR_SET_PDEATHSIG),
 *     as capsa-vmm itself dies with the process that started it.
 *
 * It exists in C, not as a fork of the Python that starts it, because a
 * forked Python keeps a private copy of every page its parent later writes
 * (about 10 MiB per sandbox); this one costs a few hundred KiB.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile pid_t child = -1;

static void pass_on(int signo)
{
    if (child > 0)
        kill(child, signo);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: capsa-vmm PROGRAM [ARG...]\n");
        return 2;
    }
    prctl(PR_SET_NAME, "capsa-vmm", 0, 0, 0);

    struct sigaction forward;
    memset(&forward, 0, sizeof(forward));
    forward.sa_handler = pass_on;
    sigemptyset(&forward.sa_mask);
    /* Blocked until the child's pid is known, so none is lost in between. */
    sigset_t passed, previous;
    sigemptyset(&passed);
    sigaddset(&passed, SIGTERM);
    sigaddset(&passed, SIGINT);
    sigaddset(&passed, SIGHUP);
    sigprocmask(SIG_BLOCK, &passed, &previous);

    pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "capsa-vmm: fork: %s\n", strerror(errno));
        return 126;
    }
    if (pid == 0) {
        /* Our parent is outside the namespace: getppid() says 0 here. */
        if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0)
            _exit(127);
        sigprocmask(SIG_SETMASK, &previous, NULL);
        execv(argv[1], argv + 1);
        fprintf(stderr, "capsa-vmm: cannot execute %s: %s\n", argv[1], strerror(errno));
        _exit(127);
    }
    child = pid;
    sigaction(SIGTERM, &forward, NULL);
    sigaction(SIGINT, &forward, NULL);
    sigaction(SIGHUP, &forward, NULL);
    sigprocmask(SIG_SETMASK, &previous, NULL);

    int status;
    for (;;) {
        pid_t done = waitpid(pid, &status, 0);
        if (done == pid)
            break;
        if (done < 0 && errno != EINTR)
            return 127;
    }
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    int signo = WTERMSIG(status);
    signal(signo, SIG_DFL);
    sigprocmask(SIG_SETMASK, &previous, NULL);
    raise(signo);
    return 128 + signo;
}
