"""Calibration of the steady-explosion rule (bpkit.detect.SteadyExplosionDetector): the largest
||g|| / ||w|| of any weight matrix over the first steps of healthy nets, against exploding tanh RNNs.

    python benchmarks/steady_calibration.py
"""
import torch, torch.nn as nn, torch.nn.functional as F
from bpkit.models import RNN, MLP, ResNet
torch.manual_seed(0)
def run(name, model, batch_fn, loss_fn, steps=60, opt="sgd", lr=0.05):
    o = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if opt=="sgd" else torch.optim.Adam(model.parameters(), lr=lr)
    worst=0; where=None
    for s in range(steps):
        x,y=batch_fn()
        loss=loss_fn(model(x),y); o.zero_grad(); loss.backward()
        for n,p in model.named_parameters():
            if p.grad is None or p.dim()<2: continue
            w=p.norm().item()
            if w<1e-6: continue
            r=p.grad.norm().item()/w
            if r>worst: worst, where = r, (n,s)
        o.step()
    print(f"{name:34s} max g/w over {steps} steps = {worst:.3g} at {where}")
X=torch.randn(2048,64); Y=(X[:,:10].sum(1)>0).long()
def cls(): i=torch.randint(0,2048,(64,)); return X[i],Y[i]
for depth,act,norm in ((8,"relu","none"),(16,"relu","none"),(8,"tanh","none"),(16,"relu","batch"),(16,"relu","layer"),(32,"relu","none")):
    run(f"mlp d{depth} {act} {norm}", MLP(64,2,depth=depth,activation=act,norm=norm), cls, F.cross_entropy)
run("mlp d8 relu adam lr1e-3", MLP(64,2,depth=8), cls, F.cross_entropy, opt="adam", lr=1e-3)
IM=torch.randn(512,1,16,16); IY=torch.randint(0,10,(512,))
def img(): i=torch.randint(0,512,(32,)); return IM[i],IY[i]
run("resnet bn", ResNet(), img, F.cross_entropy)
run("resnet no-res bn d8", ResNet(depth=8, residual=False), img, F.cross_entropy)
S=torch.randn(512,40,2); SY=S[:,:,0].mean(1,keepdim=True)
def seq(): i=torch.randint(0,512,(32,)); return S[i],SY[i]
class W(nn.Module):
    def __init__(s,m): super().__init__(); s.m=m
    def forward(s,x): return s.m(x)[0]
for cell,sc in (("lstm",None),("gru",None),("rnn_tanh",1.0),("rnn_tanh",0.9)):
    run(f"{cell} scale{sc} T40", W(RNN(cell,2,64,out_features=1,recurrent_scale=sc)), seq, F.mse_loss, lr=0.01)
class Tiny(nn.Module):
    def __init__(s):
        super().__init__(); s.emb=nn.Embedding(50,32); s.enc=nn.TransformerEncoder(nn.TransformerEncoderLayer(32,4,64,batch_first=True,dropout=0.0),2); s.head=nn.Linear(32,50)
    def forward(s,x): return s.head(s.enc(s.emb(x)))
T=torch.randint(0,50,(512,17))
def tok(): i=torch.randint(0,512,(32,)); return T[i,:-1],T[i,1:]
run("transformer 2L", Tiny(), tok, lambda o,y: F.cross_entropy(o.reshape(-1,50),y.reshape(-1)), opt="adam", lr=1e-3)
run("transformer 2L sgd", Tiny(), tok, lambda o,y: F.cross_entropy(o.reshape(-1,50),y.reshape(-1)), lr=0.1)
for sc in (1.5,2.0,3.0):
    run(f"rnn_tanh scale{sc} T40 (exploding)", W(RNN("rnn_tanh",2,64,out_features=1,recurrent_scale=sc)), seq, F.mse_loss, steps=5, lr=0.0)
