/* The leanest TCP forwarder for one connection, to measure what any
 * user-space forwarder adds to a round trip on this machine (see
 * forward_floor.py).  Two threads, one per direction, blocking recv/send;
 * with SPIN_US > 0 each first busy-polls recv(MSG_DONTWAIT) for that long.
 * No error handling beyond what the measurement needs.
 *
 *   minfwd LISTEN_PORT TARGET_PORT [SPIN_US]   (127.0.0.1 only, one connection)
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <errno.h>
#include <sched.h>
static long spin_ns;
struct dir { int src, dst; };
static long now_ns(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1000000000L+t.tv_nsec;}
static void *pump(void *arg){
    struct dir *d=arg; char buf[65536];
    for(;;){
        ssize_t n=-1;
        if(spin_ns>0){
            long end=now_ns()+spin_ns;
            do{ n=recv(d->src,buf,sizeof buf,MSG_DONTWAIT); if(n>=0||errno!=EAGAIN)break; }while(now_ns()<end);
        }
        if(n<0){ n=recv(d->src,buf,sizeof buf,0); }
        if(n<=0){shutdown(d->dst,SHUT_WR);return 0;}
        for(ssize_t off=0;off<n;){ssize_t w=send(d->dst,buf+off,n-off,MSG_NOSIGNAL); if(w<0)return 0; off+=w;}
    }
}
int main(int argc,char**argv){
    int lport=atoi(argv[1]),tport=atoi(argv[2]); spin_ns=argc>3?atol(argv[3])*1000:0;
    int l=socket(AF_INET,SOCK_STREAM,0),one=1; setsockopt(l,SOL_SOCKET,SO_REUSEADDR,&one,4);
    struct sockaddr_in a={.sin_family=AF_INET,.sin_port=htons(lport)}; a.sin_addr.s_addr=htonl(0x7f000001);
    if(bind(l,(void*)&a,sizeof a)||listen(l,16)){perror("bind");return 1;}
    int c=accept(l,0,0); int t=socket(AF_INET,SOCK_STREAM,0);
    a.sin_port=htons(tport); if(connect(t,(void*)&a,sizeof a)){perror("connect");return 1;}
    setsockopt(c,IPPROTO_TCP,TCP_NODELAY,&one,4); setsockopt(t,IPPROTO_TCP,TCP_NODELAY,&one,4);
    struct dir d1={c,t},d2={t,c}; pthread_t p1,p2;
    pthread_create(&p1,0,pump,&d1); pthread_create(&p2,0,pump,&d2); pthread_join(p1,0); pthread_join(p2,0); return 0;
}
